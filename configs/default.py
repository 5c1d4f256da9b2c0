"""A tiny tied model with the augmented loss that trains on PTB in about a minute on a CPU.

Every knob of `tied_lm` is defined here; `configs/paper.py` sets the paper's
values on top of it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "ptb"  # ptb | wikitext2 | text
  # '' -> $TIED_LM_DATA_DIR -> ~/.cache/tied_lm. For 'text', the directory
  # with train.txt, valid.txt and test.txt.
  config.data_dir = ""
  # 'text' only: the vocabulary's size, <unk> included (the N - 1 most frequent
  # train words, <unk> for the rest); 0 keeps every train word.
  config.max_vocab_size = 0

  config.batch_size = 20
  config.num_steps = 20  # the unroll of truncated BPTT
  # Evaluation scores every target token for any batch size; only batch 1
  # conditions each token on the whole history (other rows start cold).
  config.eval_batch_size = 10
  config.num_epochs = 2
  config.max_steps_per_epoch = 150  # 0 means full epochs
  config.seed = 0
  config.log_every_steps = 50
  # Checkpoints are written at the end of every epoch and, within an epoch,
  # every this many steps (0: epoch ends only). A killed run loses at most
  # the steps since the last one.
  config.checkpoint_every_steps = 500
  # A step with a non-finite loss or gradient: "stop" the run (keeping the
  # last checkpoint) or "skip" it (no update; counted in metrics.jsonl).
  config.on_nonfinite = "stop"

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 64
  config.model.hidden_size = 64
  config.model.num_layers = 2
  config.model.tie_embeddings = True
  config.model.output_bias = False
  # With tying and hidden_size != embed_dim: True adds a projection to
  # embed_dim before the tied output layer, False refuses the config.
  config.model.output_projection = False
  config.model.init_scale = 0.1
  # Variational dropout (drop probabilities), one mask per window: on the
  # embedding output, on each layer's hidden state (recurrent use and next
  # layer's input share it) and on the last layer's output.
  config.model.input_dropout = 0.0
  config.model.hidden_dropout = 0.0
  config.model.output_dropout = 0.0
  # Time steps per iteration of the recurrent loop (speed only, same numbers).
  config.model.unroll = 1
  # "bfloat16": mixed precision (bf16 matmul inputs, float32 parameters,
  # accumulation and losses); evaluation always runs in float32.
  config.model.compute_dtype = "float32"
  # "cudnn": each LSTM layer as one jax.experimental.rnn call (NVIDIA GPUs,
  # float32 only). cuDNN takes no recurrent dropout mask: the hidden mask then
  # drops only the next layer's input (the PyTorch reference's placement).
  config.model.lstm_implementation = "scan"

  config.loss = ml_collections.ConfigDict()
  config.loss.augmented = True
  config.loss.tau = 10.0
  config.loss.gamma = 0.65  # the KL weight is alpha = gamma * tau
  config.loss.stop_gradient_target = False  # the paper lets L learn through ỹ
  # "kl": J_aug = KL(ỹ ‖ ŷ), the paper's. "cross_entropy": H(ỹ, ŷ) = KL + H(ỹ), a
  # soft-label cross-entropy; same gradient on the logits, and through ỹ it also
  # lowers ỹ's entropy (a reading of an unreleased implementation, not the text).
  config.loss.augmented_form = "kl"
  # False: ŷ = softmax(W h / τ), bias-free as the paper writes it. True: ŷ from the
  # model's logits with their output bias, softmax((W h + b) / τ), as code that
  # divides its logits by τ would compute it (a reading, not the text; needs
  # model.output_bias).
  config.loss.kl_output_bias = False

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1.0
  config.optim.decay_start_epoch = 1  # constant for this many epochs, then decay
  config.optim.decay_rate = 0.5
  config.optim.clip_norm = 5.0
  # Locked: a config built on this one that sets a field it lacks (a misspelling) is an
  # error, as a misspelt --config.FIELD override is.
  config.lock()
  return config
