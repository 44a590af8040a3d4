"""The TensorFlow/Keras port of XLM's PKM layer, brought back to PyTorch the way it was written.

Source read (not copied): https://github.com/Rocketknight1/tf-pkm-layer, `tf_memory_layer.py`
(`HashingMemory(tf.Module)`, a "straightforward reimplementation" of the XLM notebook's layer
in TF 2, benchmarked as 6 PKM layers in a BERT-base-sized stack). Keras and TF habits kept:

- `Dense(heads * k_dim, use_bias=True)` with a kernel stored [in, out] (`x @ kernel + b`),
  `BatchNormalization(momentum=0.1)` in inference mode with Keras's epsilon 1e-3 (not
  PyTorch's 1e-5);
- keys drawn with `np.random.RandomState(seed).uniform` into ONE [heads, 2, n_keys, half]
  variable, values from `np.random.normal` (the module-level numpy RNG);
- a Python loop over heads; per head `tf.matmul(q1, subkeys[0], transpose_b=True)`,
  `tf.math.top_k(..., sorted=True)`, broadcasting with `tf.expand_dims` ("The original code
  used torch.repeat, we can just use broadcasting"), `tf.gather(..., batch_dims=-1)`
  (`torch.gather`), `tf.concat` of the heads;
- no EmbeddingBag in TF: `tf.gather(self.values, indices)` then
  `tf.reduce_sum(values * tf.expand_dims(scores, -1), axis=1)` over heads · knn at once.

The layer sits where the README's benchmark puts it, a BERT feed-forward slot:
`LayerNormalization(epsilon=1e-3)(x + memory(x))` (post-norm).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ._trained import factory, fan_in, float_inputs, gains, normal, private_global_rng, seeded


class Dense(nn.Module):
    def __init__(self, in_features: int, units: int, use_bias: bool = True) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(in_features, units))
        self.bias = nn.Parameter(torch.zeros(units)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.kernel)
        return y + self.bias if self.bias is not None else y


class BatchNormalization(nn.Module):
    """keras.layers.BatchNormalization called with training=False."""

    def __init__(self, units: int, momentum: float = 0.99, epsilon: float = 1e-3) -> None:
        super().__init__()
        self.momentum, self.epsilon = momentum, epsilon
        self.gamma = nn.Parameter(torch.ones(units))
        self.beta = nn.Parameter(torch.zeros(units))
        self.register_buffer("moving_mean", torch.zeros(units))
        self.register_buffer("moving_variance", torch.ones(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = torch.rsqrt(self.moving_variance + self.epsilon) * self.gamma
        return x * inv + (self.beta - self.moving_mean * inv)


class HashingMemory(nn.Module):
    def __init__(
        self,
        input_dim,
        output_dim,
        k_dim=256,
        heads=4,
        knn=32,
        n_keys=512,
        query_batchnorm=True,
        seed=12345,
    ):
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.k_dim = k_dim
        self.v_dim = output_dim
        self.n_keys = n_keys
        self.size = self.n_keys**2
        self.heads = heads
        self.knn = knn
        assert self.k_dim >= 2 and self.k_dim % 2 == 0
        half = self.k_dim // 2
        key_bound = 1 / math.sqrt(half)
        rng = np.random.RandomState(seed)

        keys = rng.uniform(size=(self.heads, 2, self.n_keys, half), low=-key_bound, high=key_bound)
        self.keys = nn.Parameter(torch.tensor(keys, dtype=torch.float32))
        self.values = nn.Parameter(
            torch.tensor(
                np.random.normal(loc=0, scale=self.v_dim**-0.5, size=(self.size, self.v_dim)),
                dtype=torch.float32,
            )
        )
        self.batchnorm = (
            BatchNormalization(self.heads * self.k_dim, momentum=0.1) if query_batchnorm else None
        )
        self.query_proj = Dense(input_dim, self.heads * self.k_dim, use_bias=True)

    def _get_indices(self, query, subkeys):
        assert len(query.shape) == 2 and query.shape[1] == self.k_dim
        bs = query.shape[0]
        knn = self.knn
        half = self.k_dim // 2
        n_keys = len(subkeys[0])

        q1 = query[:, :half]
        q2 = query[:, half:]

        scores1 = torch.matmul(q1, subkeys[0].transpose(0, 1))  # transpose_b=True
        scores2 = torch.matmul(q2, subkeys[1].transpose(0, 1))
        scores1, indices1 = torch.topk(scores1, knn, sorted=True)
        scores2, indices2 = torch.topk(scores2, knn, sorted=True)

        all_scores = torch.unsqueeze(scores1, 2) + torch.unsqueeze(scores2, 1)  # (bs, knn, knn)
        all_scores = torch.reshape(all_scores, (bs, -1))
        all_indices = torch.unsqueeze(indices1, 2) * n_keys + torch.unsqueeze(indices2, 1)
        all_indices = torch.reshape(all_indices, (bs, -1))

        scores, best_indices = torch.topk(all_scores, k=knn, sorted=True)
        indices = torch.gather(all_indices, 1, best_indices)  # tf.gather(batch_dims=-1)
        return scores, indices

    def get_indices(self, query):
        assert len(query.shape) == 2 and query.shape[1] == self.k_dim
        query = torch.reshape(query, (-1, self.heads, self.k_dim))
        bs = query.shape[0]
        outputs = [self._get_indices(query[:, i], self.keys[i]) for i in range(self.heads)]
        s = torch.concat([torch.reshape(s, (bs, 1, self.knn)) for s, _ in outputs], 1)
        i = torch.concat([torch.reshape(i, (bs, 1, self.knn)) for _, i in outputs], 1)
        return torch.reshape(s, (-1, self.knn)), torch.reshape(i, (-1, self.knn))

    def forward(self, input):
        assert input.shape[-1] == self.input_dim
        prefix_shape = input.shape[:-1]
        bs = np.prod(prefix_shape)

        query = self.query_proj(torch.reshape(input, (-1, self.input_dim)))
        if self.batchnorm is not None:
            query = self.batchnorm(query)
        query = torch.reshape(query, (bs * self.heads, self.k_dim))

        scores, indices = self.get_indices(query)
        scores = torch.softmax(scores, dim=-1)

        indices = torch.reshape(indices, (bs, self.heads * self.knn))
        scores = torch.reshape(scores, (bs, self.heads * self.knn))

        values = self.values[indices]  # tf.gather(self.values, indices)
        output = torch.sum(values * torch.unsqueeze(scores, -1), dim=1)

        if len(prefix_shape) >= 2:
            output = torch.reshape(output, (*prefix_shape, self.v_dim))
        return output


class BertMemoryOutput(nn.Module):
    def __init__(self, dim: int, memory: HashingMemory) -> None:
        super().__init__()
        self.memory = memory
        self.layer_norm = nn.LayerNorm(dim, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.memory(x))


# input/output 64 (768), k_dim 32 (256), 4 heads, knn 8 (32), 32 x 32 keys (512²)
keras_inputs = float_inputs(64, seed=804)


@factory
def tf_pkm_keras_port() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(801)
    numpy_state = np.random.get_state()  # the constructor draws values from numpy's global RNG
    with private_global_rng():
        mem = HashingMemory(64, 64, k_dim=32, heads=4, knn=8, n_keys=32, query_batchnorm=True)
    np.random.set_state(numpy_state)
    model = BertMemoryOutput(64, mem)
    with torch.no_grad():
        mem.keys.copy_(normal(g, *mem.keys.shape, std=1 / math.sqrt(16)))
        mem.values.copy_(normal(g, *mem.values.shape, std=0.5))
        mem.query_proj.kernel.copy_(fan_in(g, 128, 64).t())
        mem.query_proj.bias.copy_(normal(g, 128, std=0.1))
        q = mem.query_proj(keras_inputs(4, 16)[0].reshape(-1, 64))
        bn = mem.batchnorm
        bn.moving_mean.copy_(q.mean(0) - 0.1)
        bn.moving_variance.copy_(q.var(0) * (1.3 + torch.rand(128, generator=g)))
        bn.gamma.copy_(gains(g, 128, spread=0.3))
        bn.beta.copy_(normal(g, 128, std=0.15))
        model.layer_norm.weight.copy_(gains(g, 64))
        model.layer_norm.bias.copy_(normal(g, 64, std=0.05))
    return model.eval(), keras_inputs(2, 16)
