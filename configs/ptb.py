"""The paper's PTB models: --config=configs/ptb.py:SIZE,VARIANT (see paper.py)."""

import ml_collections

from configs import paper


def get_config(config_string: str = "small,real") -> ml_collections.ConfigDict:
  return paper.get_config("ptb", config_string)
