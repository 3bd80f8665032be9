"""Ray workers: the Tune trainable that trains a child model with a pattern applied,
the child models (WideResNet, GPT-style language model) and the dataset loaders."""
