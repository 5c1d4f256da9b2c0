"""The paper's WikiText-2 models: --config=configs/wikitext2.py:SIZE,VARIANT."""

import ml_collections

from configs import paper


def get_config(config_string: str = "small,real") -> ml_collections.ConfigDict:
  return paper.get_config("wikitext2", config_string)
