"""An independent PyTorch implementation of the tied LSTM LM and its augmented loss.

Used by `experiments/benchmark.py --compare=torch` as the alternative users
would otherwise run. It mirrors `tied_lm` (sizes, tying, output projection and
bias, variational dropout, J = sum_t [CE + gamma * tau * KL] / batch, gradient
clipping, SGD) but is written the PyTorch way, with `nn.LSTM` so that PyTorch
runs its fused kernels (cuDNN on GPU).

Two differences, both forced by `nn.LSTM`:
  * it cannot mask h on its recurrent path, so the per-window dropout masks sit
    on each layer's input and on the last output only (ours also mask the
    recurrent h: one [B, H] multiply per time step);
  * it has two biases per layer (b_ih, b_hh); `load_flax_params` puts ours in
    b_ih and zeros in b_hh.

Tensors are time-major inside, like `tied_lm.models`. Requires `pip install -e .[bench]`.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class TorchLanguageModel(torch.nn.Module):
  """Embedding -> one `nn.LSTM` per layer -> [projection] -> (tied) logits."""

  def __init__(
      self,
      vocab_size: int,
      embed_dim: int,
      hidden_size: int,
      num_layers: int = 2,
      tie_embeddings: bool = True,
      output_bias: bool = False,
      output_projection: bool = False,
      init_scale: float = 0.1,
      input_dropout: float = 0.0,
      hidden_dropout: float = 0.0,
      output_dropout: float = 0.0,
      unroll: int = 1,
      compute_dtype: str = "float32",
      lstm_implementation: str = "scan",
  ):
    del unroll, lstm_implementation  # speed knobs of the JAX model; nn.LSTM has its own
    super().__init__()
    # "bfloat16": torch's own mixed precision, autocast (see `make_train_step`).
    self.autocast_dtype = torch.bfloat16 if compute_dtype == "bfloat16" else None
    if tie_embeddings and hidden_size != embed_dim and not output_projection:
      raise ValueError("tie_embeddings needs hidden_size == embed_dim or a projection")
    self.embed = torch.nn.Embedding(vocab_size, embed_dim)
    # One nn.LSTM per layer, so that a variational mask can sit between layers.
    self.layers = torch.nn.ModuleList(
        torch.nn.LSTM(embed_dim if i == 0 else hidden_size, hidden_size)
        for i in range(num_layers)
    )
    out_dim = hidden_size
    self.projection = None
    if tie_embeddings and hidden_size != embed_dim:
      self.projection = torch.nn.Linear(hidden_size, embed_dim, bias=False)
      out_dim = embed_dim
    self.decoder = torch.nn.Linear(out_dim, vocab_size, bias=False)
    if tie_embeddings:
      self.decoder.weight = self.embed.weight
    self.output_bias = torch.nn.Parameter(torch.zeros(vocab_size)) if output_bias else None
    self.dropouts = (input_dropout, hidden_dropout, output_dropout)
    for p in self.parameters():
      torch.nn.init.uniform_(p, -init_scale, init_scale)
    # nn.LSTM adds two biases, b_ih + b_hh; ours has one. b_hh stays 0 and untrained:
    # trained too, the sum took each bias gradient twice (and twice in the clipped norm).
    for layer in self.layers:
      layer.bias_hh_l0.requires_grad_(False).zero_()

  def _mask(self, x: torch.Tensor, rate: float) -> torch.Tensor:
    """Variational dropout: one [1, B, D] mask for every time step of x [T, B, D]."""
    if not self.training or rate == 0.0:
      return x
    keep = torch.empty_like(x[:1]).bernoulli_(1.0 - rate) / (1.0 - rate)
    return x * keep

  def hidden_states(
      self, tokens: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]]
  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Embedding and LSTM stack: tokens [B, T] -> (masked last h [B, T, H], new state)."""
    input_rate, hidden_rate, output_rate = self.dropouts
    x = self._mask(self.embed(tokens.t()), input_rate)  # [T, B, E]
    new_state = []
    for i, (layer, layer_state) in enumerate(zip(self.layers, state, strict=True)):
      x, layer_state = layer(x, layer_state)
      new_state.append(layer_state)
      if i + 1 < len(self.layers):
        x = self._mask(x, hidden_rate)
    return self._mask(x, output_rate).transpose(0, 1), new_state

  def output_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, H] -> (logits [B, T, V], bias-free logits)."""
    if self.projection is not None:
      hidden = self.projection(hidden)
    bias_free_logits = self.decoder(hidden)
    logits = bias_free_logits if self.output_bias is None else bias_free_logits + self.output_bias
    return logits, bias_free_logits

  def forward(
      self, tokens: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]]
  ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """tokens [B, T] -> (logits [B, T, V], bias-free logits, new state).

    state: per layer (h, c), each [1, B, H].
    """
    hidden, new_state = self.hidden_states(tokens, state)
    return *self.output_logits(hidden), new_state

  def initial_state(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    device = self.embed.weight.device
    return [
        (torch.zeros(1, batch_size, layer.hidden_size, device=device),
         torch.zeros(1, batch_size, layer.hidden_size, device=device))
        for layer in self.layers
    ]


def loss_terms(
    logits: torch.Tensor,
    bias_free_logits: torch.Tensor,
    targets: torch.Tensor,
    embedding: torch.Tensor,
    loss_config: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
  """Per-token cross-entropy and KL(ỹ ‖ softmax(z / τ)), each [B, T] (KL 0 without AL).

  loss_config: tied_lm's `config.loss`, read as `train.loss_terms` reads it.
  augmented_form "cross_entropy": H(ỹ, softmax(z / τ)) in place of the KL, as in
  `tied_lm.losses`; kl_output_bias: z is `logits` (with the output bias), not
  `bias_free_logits`.
  """
  tau = loss_config.tau
  vocab_size = logits.shape[-1]
  cross_entropy = F.cross_entropy(
      logits.reshape(-1, vocab_size).float(), targets.reshape(-1), reduction="none"
  ).view(targets.shape)
  if not loss_config.augmented:
    return cross_entropy, torch.zeros_like(cross_entropy)
  target_scores = F.embedding(targets, embedding) @ embedding.t()  # [B, T, V]
  log_target = F.log_softmax(target_scores.float() / tau, dim=-1)
  if loss_config.stop_gradient_target:
    log_target = log_target.detach()
  kl_logits = logits if loss_config.kl_output_bias else bias_free_logits
  log_model = F.log_softmax(kl_logits.float() / tau, dim=-1)
  if loss_config.augmented_form == "cross_entropy":
    return cross_entropy, -(log_target.exp() * log_model).sum(-1)
  kl = F.kl_div(log_model, log_target, reduction="none", log_target=True).sum(-1)
  return cross_entropy, kl


State = list[tuple[torch.Tensor, torch.Tensor]]


def make_train_step(
    model: TorchLanguageModel, config: Any
) -> Callable[[torch.Tensor, torch.Tensor, State], tuple[State, dict[str, torch.Tensor]]]:
  """A step closure: (inputs, targets, state) -> (new state, metrics dict of tensors).

  config: the tied_lm ConfigDict (uses loss.*, optim.learning_rate, optim.clip_norm).
  Metrics stay on the device (no `.item()`), like ours between log lines.
  """
  trained = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(trained, lr=config.optim.learning_rate)
  alpha = config.loss.gamma * config.loss.tau

  def step(inputs: torch.Tensor, targets: torch.Tensor, state: State):
    model.train()
    state = [(h.detach(), c.detach()) for h, c in state]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(
        inputs.device.type, dtype=model.autocast_dtype or torch.float32,
        enabled=model.autocast_dtype is not None,
    ):
      logits, bias_free_logits, state = model(inputs, state)
      cross_entropy, kl = loss_terms(
          logits, bias_free_logits, targets, model.embed.weight, config.loss,
      )
    loss = (cross_entropy + alpha * kl).sum() / inputs.shape[0]
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, config.optim.clip_norm)
    optimizer.step()
    return state, {"cross_entropy_sum": cross_entropy.detach().sum(),
                   "kl_sum": kl.detach().sum(), "grad_norm": grad_norm}

  return step


@torch.no_grad()
def eval_step(
    model: TorchLanguageModel, inputs: torch.Tensor, targets: torch.Tensor, state: State
) -> tuple[State, torch.Tensor]:
  """(new state, NLL sum) of one window without dropout."""
  model.eval()
  logits, _, state = model(inputs, state)
  nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
  return state, nll


def load_flax_params(model: TorchLanguageModel, params: Any) -> None:
  """Copies `tied_lm` params into `model`, so that both compute the same function."""

  def tensor(x):
    return torch.from_numpy(np.array(x, np.float32))

  with torch.no_grad():
    model.embed.weight.copy_(tensor(params["embed"]["embedding"]))
    for i, layer in enumerate(model.layers):
      ours = params[f"lstm_{i}"]
      # Both use gate order (i, f, g, o); torch stores [4H, D] transposed.
      layer.weight_ih_l0.copy_(tensor(ours["input_kernel"]).t())
      layer.weight_hh_l0.copy_(tensor(ours["recurrent_kernel"]).t())
      layer.bias_ih_l0.copy_(tensor(ours["bias"]))
      layer.bias_hh_l0.zero_()
    if model.projection is not None:
      model.projection.weight.copy_(tensor(params["projection"]["kernel"]).t())
    if "output_kernel" in params:
      model.decoder.weight.copy_(tensor(params["output_kernel"]["kernel"]).t())
    if model.output_bias is not None:
      model.output_bias.copy_(tensor(params["output_bias"]))
