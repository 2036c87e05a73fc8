"""Small edits of exported ONNX graphs that the converters need: node order and the embedding tail.

Kept apart from the converters (fp16, int8 mobile) because both read the same graph facts, and because
they are pure functions over a ``ModelProto`` that tests can check on hand-made graphs.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

__all__ = ["drop_round_trip_casts", "embedding_tail", "topological_sort"]

#: Ops that start the embedding tail (GeM's power, the L2 norm) when no convolution or matrix product follows.
_TAIL_SEEDS = frozenset({"Pow", "ReduceL2", "ReduceSumSquare", "LpNormalization"})
#: Ops that carry the feature map; a seed with one of these downstream is inside the backbone (e.g. tanh-GELU).
_FEATURE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul"})


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so that every node comes after the producers of its inputs.

    ``onnxruntime.transformers.float16`` appends the casts it adds for ``keep_io_types`` at the end of
    the node list; ONNX Runtime copes, but the ONNX checker (and other tools) require topological order.
    Ties keep the original order, so an already sorted graph is unchanged.

    Raises:
        ValueError: the graph has a cycle.
    """
    nodes = list(graph.node)
    producer = {output: i for i, node in enumerate(nodes) for output in node.output if output}
    dependants: dict[int, list[int]] = defaultdict(list)
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for name in {name for name in node.input if name in producer}:
            dependants[producer[name]].append(i)
            pending[i] += 1
    ready = deque(i for i, count in enumerate(pending) if count == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in sorted(dependants[i]):
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise ValueError(f"graph {graph.name!r} has a cycle; {len(nodes) - len(order)} node(s) cannot be ordered")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def embedding_tail(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes from the pooling's power (GeM) or the L2 norm to the output.

    These few nodes work on ``(N, C)`` vectors, not feature maps, so running them in float32 costs nothing,
    and in float16 they fail in ways a parity check on random inputs can miss: GeM raises activations to
    the power ``p`` before averaging (``x**3`` overflows float16's 65504 for ``x > 40``), and an L2 norm
    in float16 leaves the rows' norm off by ~1e-3. A seed op with a convolution or matrix product
    downstream (the ``x**3`` of a tanh-GELU) belongs to the backbone and is not part of the tail.
    """
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(i)

    def downstream(start: int) -> set[int]:
        seen, stack = {start}, [start]
        while stack:
            for output in graph.node[stack.pop()].output:
                for j in consumers.get(output, ()):
                    if j not in seen:
                        seen.add(j)
                        stack.append(j)
        return seen

    tail: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type in _TAIL_SEEDS and i not in tail:
            reach = downstream(i)
            if not any(graph.node[j].op_type in _FEATURE_OPS for j in reach):
                tail |= reach
    return [graph.node[i].name for i in sorted(tail)]


def drop_round_trip_casts(graph: onnx.GraphProto, float32_nodes: set[str]) -> int:
    """Let float32 values flow between ``float32_nodes`` without the float16 round trip a converter put in between.

    ``convert_float_to_float16`` keeps a blocked node in float32 by casting its inputs up and its output back
    down to float16, even when the next node is blocked too; each ``Cast(to=float16) -> Cast(to=float)`` pair
    throws away 13 bits of the value. Every such pair whose source is produced by one of ``float32_nodes``
    is bypassed (the second cast reads the float32 source), and casts left without consumers are removed.

    Returns:
        The number of round trips bypassed.
    """
    from onnx import TensorProto

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((attr.i for attr in node.attribute if attr.name == "to"), None)

    producer = {output: node for node in graph.node for output in node.output}
    bypassed = 0
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        down = producer.get(node.input[0])
        if down is None or cast_to(down) != TensorProto.FLOAT16:
            continue
        source = producer.get(down.input[0])
        if source is not None and source.name in float32_nodes:
            node.input[0] = down.input[0]
            bypassed += 1
    graph_outputs = {value.name for value in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | graph_outputs
        dead = [node for node in graph.node if node.op_type == "Cast" and not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    live = {name for node in graph.node for name in (*node.input, *node.output)}
    kept = [value for value in graph.value_info if value.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return bypassed
