"""P50: the same LM with unnormalised sigmoid attention (the paper's "no sink" setting)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from p50_sink_softmax import get_config as _softmax  # noqa: E402


def get_config():
    config = _softmax()
    config["name"] = "p50_sink_sigmoid"
    config["model"]["method"] = "sigmoid"
    config["model"]["method_config"] = {"normalize": False}
    return config
