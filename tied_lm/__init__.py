"""tied_lm: LSTM language models with tied embeddings and the augmented loss.

The pure, importable API:
  tied_lm.losses: cross_entropy, target_distribution, augmented_loss
  tied_lm.models: LSTMLanguageModel
  tied_lm.data: load_corpus, train_windows, eval_windows
  tied_lm.train: train_and_evaluate, train_step, evaluate
"""

__version__ = "0.1.0"
