"""Where and how a run computes: seeds and op determinism, precision, the distribution
strategy (none, mirrored, multiworker from TF_CONFIG) and this process's place among the workers."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from kdsb.errors import UsageError

logger = logging.getLogger(__name__)


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


STRATEGIES = ("none", "mirrored", "multiworker")


# The environment variable that describes a multi-worker cluster and this process's place in it.
TF_CONFIG = "TF_CONFIG"


TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
    '"index": 0}}'
)


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's place among the training processes.

    Attributes:
        index: 0 for the chief, 1 … count - 1 for the others.
        count: training processes (1 unless `--distribute multiworker`).
    """

    index: int = 0
    count: int = 1

    @property
    def chief(self) -> bool:
        """The process that writes the run folder."""
        return self.index == 0

    def seed(self, seed: int) -> int:
        """A seed of this worker's own data stream (`seed` itself for the chief), so workers
        draw different patches and augmentations and a run still repeats."""
        return int(seed) + self.index * WORKER_SEED_STRIDE


# Workers' data seeds lie this far apart: beyond any epoch offset a resumed run adds.
WORKER_SEED_STRIDE = 1_000_000_007


def read_tf_config(environ: Mapping[str, str] | None = None) -> Worker:
    """This process's `Worker` from the TF_CONFIG environment variable.

    TF_CONFIG is JSON: `cluster` maps "worker" (and optionally "chief") to lists of
    "host:port"; `task` names this process: type "worker" or "chief", and its index in that
    list. The chief is task "chief", or worker 0 when the cluster has no chief; the workers
    follow it in order.

    Raises:
        UsageError: TF_CONFIG is missing, not JSON, or not of that form.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG)
    if not text:
        raise UsageError(
            f"expected the {TF_CONFIG} environment variable with --distribute multiworker "
            f"(e.g. {TF_CONFIG_EXAMPLE}), received none"
        )
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        kind, index = task["type"], task["index"]
        if (len(chiefs) > 1 or kind not in ("chief", "worker") or not isinstance(index, int)
                or not 0 <= index < len(chiefs if kind == "chief" else workers)):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(
            f"expected {TF_CONFIG} as JSON like {TF_CONFIG_EXAMPLE} (task type worker or chief, "
            f"index within its list), received {text!r}"
        ) from None
    return Worker(index=index if kind == "chief" else len(chiefs) + index,
                  count=len(chiefs) + len(workers))


def worker(distribute: str) -> Worker:
    """This process's `Worker` under strategy `distribute` (the only one unless multiworker)."""
    return read_tf_config() if distribute == "multiworker" else Worker()


def wait_for_workers(distribute: str) -> None:
    """Under multiworker, block until every worker calls it too (a collective barrier).

    Commands call it last: a worker that exits while the chief still writes its reports makes
    TensorFlow abort the chief's collective ops.
    """
    if distribute != "multiworker":
        return
    import tensorflow as tf

    strategy = distribution_strategy(distribute)

    @tf.function
    def barrier():
        return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    barrier()


def keras_verbosity(distribute: str = "none") -> int:
    """`verbose` of `keras.Model.fit`: silent under `kdsb -q` and on workers other than the
    chief, a progress bar on a terminal, one line per epoch otherwise."""
    if not logger.isEnabledFor(logging.INFO) or not worker(distribute).chief:
        return 0
    return 1 if sys.stdout.isatty() else 2


def configure_runtime(*, seed: int, precision: str = "float32") -> None:
    """Seed every random generator, make TensorFlow's ops deterministic and choose the numeric
    precision of the layers.

    Call it once, before building models or datasets. With the same seed, options, data,
    machine and software a run then repeats bit for bit: weights, history, predictions (kdsb's
    tf.data pipelines draw their randomness from `seed` and keep their order).

    Op determinism (`tf.config.experimental.enable_op_determinism`) makes kernels that may sum
    in a varying order (mostly on GPUs) use deterministic algorithms, and forces every tf.data
    map and interleave to keep its order. It is a switch of the whole process, not of one run:
    TensorFlow has no public call to turn it off, and calling it again is harmless. While it is
    on, TensorFlow random ops need a seed (set here), `tf.timestamp` raises, an op without a
    deterministic implementation raises `UnimplementedError`, and some GPU kernels are slower.

    Args:
        seed: seeds Python's `random`, NumPy and TensorFlow (`keras.utils.set_random_seed`,
            which also resets TensorFlow's op-seed counter and Keras's global seed generator).
        precision: "float32"; "mixed_bfloat16" (bf16 compute, float32 weights: CPUs with
            AVX512-BF16/AMX and recent GPUs); or "mixed_float16" (fp16 compute, float32 weights:
            GPUs; Keras then scales the loss against underflow). Losses that must stay exact
            cast to float32 themselves.

    Raises:
        UsageError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise UsageError(
            f"expected a precision among {', '.join(PRECISIONS)}, received {precision!r}"
        )
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(precision)
    if precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        # Measured on 2 CPU cores (a user's check): bags of the nll head encoded ~15x slower.
        logger.warning("--precision mixed_float16 without a GPU: TensorFlow computes float16 "
                       "slowly on CPUs (many times float32's time); mixed_bfloat16 or float32 "
                       "suit a CPU")
    logger.debug("seed %d, op determinism on, precision policy %s", seed, precision)


def distribution_strategy(name: str = "none") -> Any:
    """A `tf.distribute` strategy by name.

    Args:
        name: "none": the default strategy (one device; TensorFlow still uses every CPU core).
            "mirrored": `tf.distribute.MirroredStrategy` with data parallelism over every GPU of
            this machine, or, without GPUs, over every logical CPU device (tests split the CPU
            into two with `tf.config.set_logical_device_configuration` before TensorFlow
            initialises). Each batch is split between the devices; gradients are summed.
            "multiworker": `tf.distribute.MultiWorkerMirroredStrategy` over the processes that
            TF_CONFIG lists (`read_tf_config`), each with its devices; gradients are
            all-reduced every step. Created once per process, before any other TensorFlow op.

    Returns:
        The strategy; build and compile models inside `strategy.scope()` (`fit` does).

    Raises:
        UsageError: an unknown name; multiworker without a valid TF_CONFIG.
    """
    if name not in STRATEGIES:
        raise UsageError(f"expected a strategy among {', '.join(STRATEGIES)}, received {name!r}")
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        return _multiworker_strategy(read_tf_config())
    return _mirrored_strategy()


# One strategy of each kind per process: `begin` creates it, `train` and `fit` reuse it.
@functools.cache
def _mirrored_strategy() -> Any:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    if len(devices) < 2:
        logger.warning("mirrored strategy over one device (%s): no speed-up to expect", devices[0])
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    logger.info("mirrored strategy over %d devices: %s", len(devices), ", ".join(devices))
    return strategy


@functools.cache
def _multiworker_strategy(this: Worker) -> Any:
    import tensorflow as tf

    class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """MultiWorkerMirroredStrategy with the two reductions Keras 3's `fit` asks of it.

        Keras (3.15, `keras.src.backend.tensorflow.trainer`) reduces a whole (x, y) batch
        before the first step, only to learn its shapes, and every step's scalar logs with
        `axis=0`; TensorFlow's strategy reduces neither (a nested value is unsupported, a
        scalar has no axis 0). Here the batch is this worker's own (shapes suffice, and
        volumes of different sizes could not be reduced), and a scalar is averaged over the
        workers, so every worker sees the same logs (the NaN guard fires on all at once).
        """

        def reduce(self, reduce_op, value, axis=None):
            if tf.nest.is_nested(value):
                return tf.nest.map_structure(lambda v: self.experimental_local_results(v)[0],
                                             value)
            if axis == 0 and all(v.shape.rank == 0 for v in self.experimental_local_results(value)):
                axis = None
            return super().reduce(reduce_op, value, axis)

    strategy = KerasMultiWorkerStrategy()
    logger.info("multi-worker strategy: worker %d of %d%s, %d replicas in all", this.index,
                this.count, " (chief)" if this.chief else "", strategy.num_replicas_in_sync)
    return strategy


def distribute_data(strategy: Any, data: Any) -> Any:
    """Under multiworker, a worker's own dataset as the distributed input of `fit` (no
    auto-sharding: the training modules shard by worker themselves)."""
    import tensorflow as tf

    if data is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return data
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = data.with_options(options)
    return strategy.distribute_datasets_from_function(lambda _: data)
