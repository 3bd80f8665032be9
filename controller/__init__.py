"""The pattern controller: an autoregressive policy over a search space's decisions,
trained with REINFORCE, exposed to Ray Tune as a ``Searcher`` (plus a random baseline)."""
