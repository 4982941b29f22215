"""Looking inside a network: per-layer gradient norms and layer responses.

He et al. 2015 answer "why do deep plain nets train worse?" with two kinds of
evidence, and these are the graph pieces that measure them:

* **Gradient flow** (:func:`attach_gradient_probe`): the L2 norm of the
  gradient of the training loss (the data term that is minimised, label
  smoothing included, weight decay left out, since its gradient is the
  decay times the weight and says nothing about what flows back from the
  loss) with respect to the kernel of every weighted layer, in network order,
  on one fixed batch of training images in training mode (batch statistics,
  as the optimizer's step sees them). Training records it after every epoch
  (history dataset ``grad_norm``, epochs x layers). With fp16 loss scaling the
  loss is multiplied by the current scale before differentiation and the
  gradients divided by it afterwards, so small gradients do not underflow.
* **Layer responses** (Fig. 7 of the paper, :func:`response_tensors`): the
  output of every 3x3 convolution "after BN and before other nonlinearity
  (ReLU/addition)". models.py registers one tensor per convolution in the
  collection ``RESPONSES`` in layer order: the batch norm's output for the
  stem and for every convolution of ``original`` and ``plain``. In a
  ``preact`` block the first convolution is followed by the block's second
  batch norm (then ReLU), so its response is that batch norm's output, as for
  the others; the second convolution is followed by no batch norm before the
  addition (BN-ReLU come before each convolution), so its response is the
  convolution's output itself: the residual function's contribution before the
  addition, the quantity the paper's argument is about (residual functions
  closer to zero than unreferenced ones).
"""

import dataclasses

import tensorflow as tf

from .graph import MODEL_SCOPE, ModelTensors, training_loss
from .models import RESPONSES

tf1 = tf.compat.v1

GRAD_NORM = "grad_norm"    # the history dataset


def layer_name(name: str, scope: str = MODEL_SCOPE) -> str:
    """``model/stage1/block2/conv1/kernel`` -> ``stage1/block2/conv1``."""
    for suffix in ("/kernel", ":0"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    prefix = scope + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


def weighted_layers(scope: str = MODEL_SCOPE) -> list:
    """The kernels of every convolution and dense layer, in network (creation) order."""
    return [v for v in tf1.trainable_variables(scope) if v.op.name.endswith("/kernel")]


@dataclasses.dataclass
class GradientProbe:
    """``norms`` (float32 [layers]) for one batch fed to ``tensors``'s placeholders."""

    layers: tuple
    norms: tf.Tensor
    tensors: ModelTensors

    def feed(self, images, labels) -> dict:
        t = self.tensors
        return {t.images: images, t.labels: labels, t.training: True}


def attach_gradient_probe(cfg, t: ModelTensors, loss_scale=None) -> GradientProbe:
    """Add the per-layer gradient norms of ``t``'s training loss to the default graph.

    ``t``: the model (with several towers, the first tower's tensors: the probe
    batch then runs through that tower alone). ``loss_scale``: fp16's current
    scale (a tensor) or None. Nothing here runs unless ``norms`` is fetched, so
    the training step does not change.
    """
    kernels = weighted_layers()
    with tf1.device(t.logits.device or None), tf1.name_scope("gradient_probe"):
        loss = training_loss(cfg, t)
        if loss_scale is not None:
            grads = tf.gradients(loss * tf.cast(loss_scale, loss.dtype), kernels)
            grads = [None if g is None else g / tf.cast(loss_scale, g.dtype) for g in grads]
        else:
            grads = tf.gradients(loss, kernels)
        norms = tf.stack([tf.zeros([]) if g is None else tf.norm(tf.cast(g, tf.float32))
                          for g in grads], name="grad_norms")
    return GradientProbe(tuple(layer_name(v.op.name) for v in kernels), norms, t)


def response_tensors(graph=None) -> list:
    """(layer name, tensor) of every 3x3 convolution's response, in layer order, of the
    first model attached to ``graph`` (towers and averaged copies register theirs too)."""
    graph = graph or tf1.get_default_graph()
    seen, out = set(), []
    for tensor in graph.get_collection(RESPONSES):
        name = layer_name(tensor.op.name.rsplit("_response", 1)[0])
        if tensor.op.name.startswith(MODEL_SCOPE + "/") and name not in seen:
            seen.add(name)
            out.append((name, tensor))
    return out


def response_moments(responses) -> tf.Tensor:
    """float64 [layers, 3]: element count, sum and sum of squares of each response
    over one batch (accumulated over batches, they give the exact mean and std)."""
    rows = []
    for _, y in responses:
        y = tf.cast(y, tf.float64)
        rows.append(tf.stack([tf.cast(tf.size(y), tf.float64), tf.reduce_sum(y),
                              tf.reduce_sum(tf.square(y))]))
    return tf.stack(rows, name="response_moments")
