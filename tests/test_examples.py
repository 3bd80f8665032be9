"""The worked examples run end to end at toy size, as a user would start them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import search_spaces
from autodropout.patterns.files import write_pattern_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_with_pattern_applies_the_pattern_trains_and_scores(tmp_path, shared_data_dir):
    space = search_spaces.load("convnet")
    tokens = [(3 * i + 1) % len(d.choices) for i, d in enumerate(space.decisions)]
    pattern_file = write_pattern_file(space.decode(tokens), tmp_path / "pattern.yaml")
    command = [sys.executable, str(EXAMPLES / "train_with_pattern.py"),
               "--pattern", str(pattern_file), "--data-dir", shared_data_dir,
               "--epochs", "1", "--train-examples", "256", "--test-examples", "500",
               "--batch-size", "32", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "3 sites -> 6 modules" in lines[0]
    for index in range(3):  # each site on both BatchNorms of its stage
        stage = f"stage{index + 1}"
        assert any(f"site {index}" in line and f"{stage}.1, {stage}.4" in line for line in lines)
    assert any(line.startswith("epoch 1/1: train loss ") for line in lines)
    assert lines[-1].startswith("test accuracy: ") and lines[-1].endswith("(500 test images)")
