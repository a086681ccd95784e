import os

os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
import time

import jax
import jax.numpy as jnp
import numpy as np

F, O = 295296, 512


def split(k):
  def fn(f, w, prec):
    b = f.shape[0]
    c = F // k
    y = jax.lax.dot_general(
      f.reshape(b, c, k), w.reshape(c, k, O), (((2,), (1,)), ((1,), (0,))), precision=prec
    )
    return jnp.sum(y, axis=0)

  return fn


plain = lambda f, w, prec: jnp.matmul(f, w, precision=prec)
variants = {"plain": plain, "k384": split(384), "k2307": split(2307), "k98432": split(98432)}
for b in (4, 64):
  f = jax.ShapeDtypeStruct((b, F), jnp.float32)
  w = jax.ShapeDtypeStruct((F, O), jnp.float32)
  fr = jax.random.normal(jax.random.key(0), (b, F))
  wr = jax.random.normal(jax.random.key(1), (F, O)) * 1e-3
  ref = np.asarray(jnp.matmul(fr, wr, precision="highest"))
  for prec in ("highest", "default"):
    for name, v in variants.items():
      loss = lambda f, w: jnp.sum(v(f, w, prec) ** 2)
      out = []
      for tag, fn in (("fwd", loss), ("gradW+f", jax.grad(loss, argnums=(0, 1)))):
        c = jax.jit(fn).lower(f, w).compile()
        out.append(f"{tag} temp {c.memory_analysis().temp_size_in_bytes / 1e6:8.1f}")
        if tag == "gradW+f":
          g = jax.jit(fn)
          r = g(fr, wr)
          jax.block_until_ready(r)
          t = time.perf_counter()
          [jax.block_until_ready(g(fr, wr)) for _ in range(10)]
          out.append(f"{(time.perf_counter() - t) / 10 * 1e3:6.2f} ms")
      y = np.asarray(jax.jit(lambda f, w: v(f, w, prec))(fr, wr))
      out.append(f"relerr {np.linalg.norm(y - ref) / np.linalg.norm(ref):.1e}")
      print(f"B={b:3d} {prec:8s} {name:6s}", "  ".join(out))
