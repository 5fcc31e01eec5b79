"""Imported first by the commands (train, evaluate, prepare, benchmark, convert):
TensorFlow, where it loads at all (gs:// files through gfile, TFDS dataset
preparation), computes nothing, so its
start-up banners (oneDNN numerics, CPU features) are noise in a training log.
Sets the environment before TensorFlow is first imported; a value the user set
is kept."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
