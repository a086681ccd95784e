"""A plain ViT for flax.linen, with mean pooling or the moment head, for benchmarks/e2e.py.

ViT-B/16 by default (224x224 images, 196 patch tokens of 768, 12 pre-LN blocks
of 12 heads, MLP 3072 with exact GELU, LayerNorm epsilon 1e-6, no class
token), written to match timm's `vit_base_patch16_224` with `class_token=False`
layer for layer, so that the two frameworks run the same arithmetic:

* "mean": tokens -> mean over tokens -> LayerNorm -> Dense(classes), as timm's
  `global_pool="avg"` (its final norm becomes `fc_norm`, after the pooling);
* "head": tokens -> LayerNorm -> `moment_jax.MomentHead` (a preset, the
  bfloat16 policy, the grid graph of the patches) -> Dense(classes).

Compute in `dtype` (bfloat16), parameters in `param_dtype` (float32);
attention is `jax.nn.dot_product_attention`; its `implementation` is a field,
"auto" taking cuDNN's fused kernel on a GPU (`attention_implementation`).

Example:
  >>> model = ViT(pooling="head")
  >>> images = jnp.zeros((2, 224, 224, 3))                    # [batch, height, width, 3]
  >>> variables = model.init(jax.random.key(0), images, train=False)
  >>> logits, updates = model.apply(variables, images, train=True,
  ...     rngs={"dropout": key}, mutable=["batch_stats"])      # [2, 1000]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from moment_jax import MomentHead, grid_graph
from moment_jax.kernels import FusedAdamW
from moment_jax.ops._checks import check_int

Pooling = Literal["mean", "head", "fused", "fused16", "xla"]
Attention = Literal["auto", "xla", "cudnn"]
POOLINGS: tuple[Pooling, ...] = ("mean", "head", "fused", "fused16")
# Not run by default: the head on its XLA path (`use_kernels=False`), to compare in one call.
EXTRA_POOLINGS: tuple[Pooling, ...] = ("xla",)
ATTENTIONS: tuple[Attention, ...] = ("auto", "xla", "cudnn")
LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Sizes of a ViT; the defaults are ViT-B/16 at 224x224 with 1000 classes.

  Attributes:
    image: image side in pixels.
    patch: patch side in pixels; `image` must be a multiple of it.
    width: token width `dim`.
    depth: number of blocks.
    heads: attention heads; `width` must be a multiple of it.
    mlp_dim: hidden width of each block's MLP.
    classes: classifier outputs.
  """

  image: int = 224
  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  classes: int = 1000

  def __post_init__(self) -> None:
    for name in ("image", "patch", "width", "depth", "heads", "mlp_dim", "classes"):
      check_int(name, getattr(self, name))
    if self.image % self.patch:
      raise ValueError(f"image: expected a multiple of patch={self.patch}, got {self.image}")
    if self.width % self.heads:
      raise ValueError(f"width: expected a multiple of heads={self.heads}, got {self.width}")

  @property
  def side(self) -> int:
    """Patches per image side (14 for ViT-B/16 at 224)."""
    return self.image // self.patch

  @property
  def tokens(self) -> int:
    """Patch tokens per image (196 for ViT-B/16 at 224)."""
    return self.side * self.side


VIT_B16 = ViTConfig()
TINY = ViTConfig(image=32, patch=8, width=64, depth=2, heads=2, mlp_dim=256, classes=10)


def attention_implementation(attention: Attention, platform: str) -> Literal["xla", "cudnn"] | None:
  """`jax.nn.dot_product_attention`'s `implementation` for an `Attention` name.

  "auto" is cuDNN's fused (flash) kernel on a GPU and XLA elsewhere: JAX's own
  default (`implementation=None`) is XLA's unfused softmax(QK^T)V (so in jax
  0.10.2's source), which writes the `[batch, heads, tokens, tokens]` scores.
  """
  if attention not in ATTENTIONS:
    raise ValueError(f"attention: expected one of {', '.join(ATTENTIONS)}, got {attention!r}")
  if attention == "auto":
    return "cudnn" if platform == "gpu" else None
  return attention


class SelfAttention(nn.Module):
  """Multi-head self-attention: one qkv projection, fused attention, one output projection.

  Attributes:
    heads: number of heads.
    attention: "auto" (cuDNN's fused kernel on a GPU, XLA elsewhere), "xla" or "cudnn".
    dtype, param_dtype: as `nn.Dense`.

  Inputs `[batch, tokens, dim]`, output `[batch, tokens, dim]`.
  """

  heads: int
  attention: Attention = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    qkv = nn.DenseGeneral(
      (3, self.heads, dim // self.heads), dtype=self.dtype, param_dtype=self.param_dtype, name="qkv"
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]
    impl = attention_implementation(self.attention, jax.default_backend())
    y = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return nn.DenseGeneral(
      dim, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
    )(y)


class Block(nn.Module):
  """Pre-LN transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))` (exact GELU).

  Attributes:
    heads: attention heads.
    mlp_dim: hidden width of the MLP.
    attention: see `SelfAttention`.
    dtype, param_dtype: as `nn.Dense`.

  Inputs and output `[batch, tokens, dim]`.
  """

  heads: int
  mlp_dim: int
  attention: Attention = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
    x = x + SelfAttention(self.heads, self.attention, name="attn", **kw)(y)
    y = nn.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)
    y = nn.Dense(self.mlp_dim, name="fc1", **kw)(y)
    y = nn.Dense(x.shape[-1], name="fc2", **kw)(nn.gelu(y, approximate=False))
    return x + y


class ViT(nn.Module):
  """ViT image classifier with mean pooling or the moment head.

  Layer for layer timm's `VisionTransformer(class_token=False)`: a 16x16
  stride-16 patch convolution, a learned position embedding, `depth` pre-LN
  blocks, then per `pooling`:

  * "mean": the mean over tokens, LayerNorm, Dense(classes) (timm's
    `global_pool="avg"`, whose final norm is `fc_norm`, after the pooling);
  * "head": LayerNorm on the tokens, `MomentHead.from_preset(head_preset,
    policy=head_policy)` with `grid_graph(side, side)`, Dense(classes);
  * "fused", "fused16": the same head with `fused_adamw=head_adamw` (its
    projection kernel's AdamW step inside the backward kernel; benchmarks/e2e.py
    gives "fused16" bfloat16 moments);
  * "xla": the same head with `use_kernels=False` (its XLA path).

  Attributes:
    config: sizes (`ViTConfig`).
    pooling: "mean", "head", "fused", "fused16" or "xla".
    head_preset: the moment head's preset.
    head_policy: the moment head's precision policy.
    head_adamw: the `FusedAdamW` of the "fused" pooling.
    attention: see `SelfAttention`.
    dtype: compute dtype of the backbone and the classifier.
    param_dtype: parameter dtype.

  Inputs: images `[batch, image, image, 3]`. Output: float32 logits
  `[batch, classes]`. The head's BatchNorm statistics live in `batch_stats`;
  its dropout draws from the `'dropout'` rng.
  """

  config: ViTConfig = VIT_B16
  pooling: Pooling = "mean"
  head_preset: str = "optimized"
  head_policy: str = "bfloat16"
  head_adamw: FusedAdamW | None = None
  attention: Attention = "auto"
  dtype: Dtype | None = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.config
    if self.pooling not in POOLINGS + EXTRA_POOLINGS:
      names = ", ".join(POOLINGS + EXTRA_POOLINGS)
      raise ValueError(f"pooling: expected one of {names}, got {self.pooling!r}")
    if images.ndim != 4 or images.shape[1:] != (cfg.image, cfg.image, 3):
      raise ValueError(
        f"images: expected shape [batch, {cfg.image}, {cfg.image}, 3], got {images.shape}"
      )
    kw: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(
      cfg.width,
      (cfg.patch, cfg.patch),
      strides=(cfg.patch, cfg.patch),
      padding="VALID",
      name="embedding",
      **kw,
    )(images)
    x = x.reshape(x.shape[0], cfg.tokens, cfg.width)  # row-major patches, as grid_graph
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.02), (1, cfg.tokens, cfg.width), self.param_dtype
    )
    x = x + pos.astype(x.dtype)
    for i in range(cfg.depth):
      x = Block(cfg.heads, cfg.mlp_dim, self.attention, name=f"block{i}", **kw)(x)
    if self.pooling == "mean":
      # Mean over tokens with a float32 accumulator, back to the compute dtype.
      y = x.mean(axis=1, dtype=jnp.float32).astype(x.dtype)
      y = nn.LayerNorm(epsilon=LN_EPS, name="fc_norm", **kw)(y)
    else:
      x = nn.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(x)
      fused = self.head_adamw if self.pooling.startswith("fused") else None
      if self.pooling.startswith("fused") and fused is None:
        raise ValueError(f"head_adamw: the {self.pooling!r} pooling needs a FusedAdamW")
      head = MomentHead.from_preset(
        self.head_preset,
        policy=self.head_policy,
        fused_adamw=fused,
        use_kernels=False if self.pooling == "xla" else None,
        name="head",
      )
      y = head(x, grid_graph(cfg.side, cfg.side), train=train)
    y = nn.Dense(cfg.classes, name="classifier", **kw)(y)
    return y.astype(jnp.float32)
