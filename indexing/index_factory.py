"""Choose a FAISS index type from the gallery size and a memory budget, from measurements on this engine's data.

The order of questions follows the FAISS wiki page "Guidelines to choose an index"
(https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index): exact search while
it is cheap, then the fastest index that reaches the recall target within the memory budget, with
storage per vector decreasing as the budget tightens. Which index is fastest was measured by
``benchmarks/bench_index.py`` (clustered 512-d unit vectors, recall@10 against exact search, 2-core
CPU; tables in ``docs/index_types.md``):

- at 200k and 1M vectors an IVF with an HNSW graph over its centroids, 4-bit PQ fast-scan codes
  ("PQ{d/4}x4fs", SIMD table lookups over packed codes) and exact re-ranking of ``k * k_factor``
  candidates from a refine store beat HNSW32 by an order of magnitude at the same recall
  (``MEASURED_1M`` holds the 1M figures the reason strings quote);
- the refine store is what memory buys: full floats ("RFlat", 4d bytes/vector), fp16
  ("Refine(SQfp16)", 2d) or 8-bit scalar codes ("Refine(SQ8)", d), the latter two within a point of
  recall of full floats on the same base;
- without room for any refine store, plain 8-bit PQ codes ("IVFk,PQmnp") of the largest size that fits.

Everything here is pure arithmetic on counts and bytes: nothing imports faiss, so a choice can be
printed, tested and recorded in the manifest before any index exists.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from retrieval.config import ConfigError

__all__ = [
    "FactoryChoice",
    "choose_factory",
    "default_memory_budget",
    "estimate_index_bytes",
    "ivf_nlist",
    "parse_size",
    "training_sample_size",
]

#: Below this many vectors exact search wins: a brute-force scan costs about a millisecond per
#: query, and no training sample or tuning is needed. The wiki's "Will you perform few searches?" /
#: "Do you need exact results?" answer is "Flat"; autofaiss uses a similar cut-off.
EXACT_MAX_VECTORS = 50_000
#: Links per vector of an HNSW graph, here the one over the IVF centroids (wiki: 4 <= M <= 64; 32 is
#: its usual example and autofaiss's default).
HNSW_M = 32
#: Dimensions per 4-bit sub-quantiser of the fast-scan PQ: PQ128x4fs at d = 512, 64 bytes per vector.
#: In an exploratory 1M x 512 run of bench_index.py's vectors (nprobe 128), PQ64x4fs (8 dims each) needed
#: k_factor 16 to come within 0.03 of PQ128x4fs's recall at k_factor 8: the longer codes rank better.
FAST_SCAN_DIMS_PER_CODE = 4
#: Vectors per block of fast-scan codes; a list's last block is padded to it.
FAST_SCAN_BLOCK = 32
#: Refine stores from the most to the least memory: factory suffix and a description for the reason.
REFINE_STORES = (
    ("RFlat", "the full float32 vectors"),
    ("Refine(SQfp16)", "float16 copies (half the memory of full floats, the same ranking)"),
    ("Refine(SQ8)", "8-bit scalar codes (a quarter of full floats)"),
)
#: Bytes per dimension of each refine store (the ``Refine(...)`` argument, "Flat" for "RFlat").
REFINE_BYTES_PER_DIM = {"Flat": 4.0, "SQfp16": 2.0, "SQbf16": 2.0, "SQ8": 1.0, "SQ6": 0.75, "SQ4": 0.5}
#: What bench_index.py measured at 1M x 512 for the refine family, quoted in the reason strings.
MEASURED_1M = (
    "measured at 1M x 512 (bench_index.py, 2 CPU cores): recall@10 0.99 at about 140x exact search's "
    "queries/s, or 0.955-0.961 at 155-220x tuned to 0.95, with any of the three refine stores"
)
#: ``default_memory_budget``: this fraction of physical RAM, or this many bytes where it is unknown.
DEFAULT_BUDGET_FRACTION = 0.5
FALLBACK_MEMORY_BUDGET = 4 * 10**9
#: From this size on, nlist = 16 sqrt(N) and the coarse quantiser is itself an HNSW graph
#: (wiki, "How big is the dataset?": "IVF65536_HNSW32" for 10M vectors and more).
LARGE_VECTORS = 10_000_000
#: Per-vector overhead of the ``IndexIDMap2`` that gives non-IVF indexes the engine's ids: an
#: 8-byte id array plus an ``unordered_map`` reverse map (about 40 bytes per entry).
IDMAP_BYTES_PER_VECTOR = 48
#: IVF inverted lists store each vector's int64 id next to its code.
IVF_ID_BYTES = 8
#: Code sizes (bytes per vector = number of PQ sub-quantisers) tried from the largest down; these
#: are the sizes FAISS's GPU IVF-PQ supports as well, so a choice also runs on GPU.
PQ_CODE_SIZES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
#: Points per centroid: FAISS's k-means warns below 39 and subsamples above 256; the wiki asks for
#: "between 30*K and 256*K" training vectors. 64 is inside that range and keeps training affordable.
MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 64
MAX_POINTS_PER_CENTROID = 256
#: Training sample for quantisers that need one but no k-means of their own size (SQ ranges, PCA):
#: 2^16 vectors, the size FAISS's PQ k-means subsamples to (256 points x 256 centroids).
DEFAULT_TRAINING_SAMPLE = MAX_POINTS_PER_CENTROID * 256


@dataclass(frozen=True)
class FactoryChoice:
    """The index type chosen for a gallery, and why.

    Attributes:
        factory: a ``faiss.index_factory`` string ("Flat", "HNSW32", "IVF4096,PQ64", ...).
        reason: one readable sentence with the sizes that decided it, for the CLI and the manifest.
        nlist: number of IVF lists, or None for non-IVF types.
        estimated_bytes: estimated memory of the filled index (codes, ids, centroids, graph links).
    """

    factory: str
    reason: str
    nlist: int | None
    estimated_bytes: int


def ivf_nlist(num_vectors: int) -> int:
    """Number of IVF lists for ``num_vectors``: the wiki's 4 sqrt(N) (16 sqrt(N) from 10M), a power of two.

    Capped so that every list gets at least ``MIN_POINTS_PER_CENTROID`` training points; for 1M
    vectors this gives 4096 and for 10M 65536, the wiki's examples.
    """
    n = max(int(num_vectors), 1)
    factor = 16 if n >= LARGE_VECTORS else 4
    nlist = 2 ** round(math.log2(max(factor * math.sqrt(n), 1.0)))
    cap = 2 ** max(int(math.log2(max(n // MIN_POINTS_PER_CENTROID, 1))), 0)
    return max(1, min(nlist, cap))


def _ivf_prefix(nlist: int, num_vectors: int) -> str:
    # With 2^16 lists or more, assigning a vector to its list by a flat scan dominates the search;
    # the wiki then uses an HNSW graph over the centroids ("IVF65536_HNSW32").
    return f"IVF{nlist}_HNSW32" if num_vectors >= LARGE_VECTORS else f"IVF{nlist}"


def _pq_factory(prefix: str, dim: int, m: int) -> str:
    # "np" (no polysemous): FAISS otherwise reorders the PQ centroids for Hamming-filtered search,
    # which the engine never uses and which multiplies training time (minutes for PQ64).
    if dim % m == 0:
        return f"{prefix},PQ{m}np"
    # PQ needs sub-vectors of equal size; an OPQ rotation to D = a multiple of m (the wiki
    # recommends D = 4m) makes any dimension work and usually improves recall too.
    out = 4 * m if 4 * m <= dim else m * max(dim // m, 1)
    return f"OPQ{m}_{out},{prefix},PQ{m}np"


def estimate_index_bytes(factory: str, num_vectors: int, dim: int) -> int:
    """Rough memory of a filled index with the engine's ids; the sizes ``choose_factory`` compares with the budget.

    Per vector: Flat 4d, HNSW 4d + 8M (the wiki's formula), IVF-Flat 4d, SQ8 d, SQfp16 2d, PQm m bytes
    (m/2 for 4-bit "PQmx4fs" codes, packed two per byte); plus 8 bytes of id in IVF lists, or
    ``IDMAP_BYTES_PER_VECTOR`` for the id map of other types (refine indexes have both); plus a refine
    store ("RFlat" 4d, "Refine(SQfp16)" 2d, "Refine(SQ8)" d). Fixed parts: the IVF centroids (with the
    HNSW graph over them for "IVFk_HNSWM"), half a 32-vector block of padding per list for fast-scan,
    PQ codebooks, the OPQ matrix.
    """
    n, d = int(num_vectors), int(dim)
    parts = _parse(factory)
    ivf = parts.nlist is not None
    if parts.pq is not None:
        code = parts.pq * parts.pq_bits / 8
    elif parts.sq_bits is not None:
        code = d * parts.sq_bits / 8
    else:
        code = 4 * d
    per_vector = code + (IVF_ID_BYTES if ivf else IDMAP_BYTES_PER_VECTOR)
    if parts.hnsw is not None and not ivf:
        per_vector += 2 * parts.hnsw * 4
    if parts.refine is not None:
        per_vector += REFINE_BYTES_PER_DIM.get(parts.refine, 4.0) * d + (IDMAP_BYTES_PER_VECTOR if ivf else 0)
    nlist = parts.nlist or 0
    fixed = 4 * d * nlist
    if parts.coarse_hnsw is not None:
        fixed += 2 * parts.coarse_hnsw * 4 * nlist
    if parts.fast_scan and ivf:
        fixed += FAST_SCAN_BLOCK / 2 * code * nlist
    if parts.pq is not None:
        fixed += 4 * d * 2**parts.pq_bits
    if parts.opq:
        fixed += 4 * d * d
    return math.ceil(n * per_vector + fixed)


def default_memory_budget() -> int:
    """The budget ``index build --factory auto`` uses when none is given: half the machine's physical RAM.

    Half, because the build holds the gallery's float32 embeddings (4d bytes per vector) beside the
    index it fills, and the server that later opens the index needs room for its encoder and requests.
    Falls back to ``FALLBACK_MEMORY_BUDGET`` where the OS does not report its memory.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY_BUDGET
    return int(total * DEFAULT_BUDGET_FRACTION) if total > 0 else FALLBACK_MEMORY_BUDGET


def _fast_scan_m(dim: int) -> int | None:
    """Sub-quantisers of the 4-bit fast-scan PQ for ``dim``: one per ``FAST_SCAN_DIMS_PER_CODE`` dimensions."""
    if dim % FAST_SCAN_DIMS_PER_CODE:
        return None
    m = dim // FAST_SCAN_DIMS_PER_CODE
    return m if m >= 2 and m % 2 == 0 else None


def _candidates(n: int, d: int) -> Iterator[tuple[str, str]]:
    """``(factory, why)`` in order of preference; ``choose_factory`` takes the first that fits the budget.

    To add an index type, yield it here at its place in the order (and keep the docstring table of
    ``choose_factory`` current); every candidate must be a valid ``faiss.index_factory`` string.
    """
    if n < EXACT_MAX_VECTORS:
        yield "Flat", f"exact search, since below {_count(EXACT_MAX_VECTORS)} vectors a scan is fast"
    nlist = ivf_nlist(n)
    lists = f"{nlist} lists ~ {16 if n >= LARGE_VECTORS else 4} sqrt(N)"
    m = _fast_scan_m(d)
    if m is not None:
        base = f"IVF{nlist}_HNSW{HNSW_M},PQ{m}x4fs"
        fast = f"{lists} found by an HNSW graph, 4-bit PQ fast-scan ({m // 2} B/vector) proposing candidates"
        for refine, store in REFINE_STORES:
            yield f"{base},{refine}", f"{fast} re-ranked from {store}; {MEASURED_1M}"
    prefix = _ivf_prefix(nlist, n)
    sizes = [size for size in PQ_CODE_SIZES if size < d]
    # Sizes that divide d need no OPQ rotation, whose training (iterated PQ trainings) takes far longer
    # than the index's own; the rotation is kept for dimensions no size divides.
    dividing = [size for size in sizes if d % size == 0]
    for pq in dividing or sizes:
        yield (
            _pq_factory(prefix, d, pq),
            f"inverted file, {pq}-byte product-quantised codes without re-ranking, {lists}",
        )


def choose_factory(
    num_vectors: int, dim: int, memory_budget_bytes: int | None = None, *, budget_note: str | None = None
) -> FactoryChoice:
    """The FAISS index type for ``num_vectors`` ``dim``-d vectors within ``memory_budget_bytes``.

    Candidates, first that fits wins (``_candidates``; the measurements behind the order are in the
    module docstring and ``docs/index_types.md``):

    ==================================  =====================================  ==============================
    factory                             when                                   bytes per vector (d = 512)
    ==================================  =====================================  ==============================
    Flat                                N < 50k and it fits                    4d + 48        (2096)
    IVFk_HNSW32,PQ{d/4}x4fs,RFlat       it fits                                4d + d/8 + 56  (2168)
    IVFk_HNSW32,PQ{d/4}x4fs,            full floats do not fit                 2d + d/8 + 56  (1144)
    Refine(SQfp16)
    IVFk_HNSW32,PQ{d/4}x4fs,            fp16 does not fit                      d + d/8 + 56   (632)
    Refine(SQ8)
    IVFk,PQmnp                          no refine store fits: the largest m    m + 8
                                        (bytes/vector) dividing d that does
                                        (OPQ only if no size divides d)
    ==================================  =====================================  ==============================

    with k = ``ivf_nlist(N)`` (4 sqrt(N), 16 sqrt(N) from 10M). Without a budget every candidate
    fits; ``indexing.builder.make_index`` passes ``default_memory_budget()`` (half the RAM) when the
    user gives none, with ``budget_note`` saying so in the reason.

    Raises:
        ValueError: non-positive sizes, or a budget too small even for 4-byte PQ codes.
    """
    n, d = int(num_vectors), int(dim)
    if n <= 0 or d <= 0:
        raise ValueError(f"choose_factory needs a positive vector count and dimension, got {n} x {d}")
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_budget_bytes}")
    budget = memory_budget_bytes
    raw = 4 * n * d
    sizes = f"{_count(n)} vectors x {d}-d float32 = {_bytes(raw)}"
    budget_text = "no memory budget" if budget is None else f"budget {_bytes(budget)}"
    if budget is not None and budget_note:
        budget_text += f" ({budget_note})"
    too_big: list[str] = []
    for factory, why in _candidates(n, d):
        est = estimate_index_bytes(factory, n, d)
        if budget is not None and est > budget:
            too_big.append(f"{factory} ~{_bytes(est)}")
            continue
        rejected = f" ({_rejected(too_big)} exceed the budget)" if too_big else ""
        reason = f"{sizes}, {budget_text}: {factory} needs ~{_bytes(est)}{rejected}; {why}"
        return FactoryChoice(factory, reason, _parse(factory).nlist, est)
    smallest = estimate_index_bytes(_pq_factory(_ivf_prefix(ivf_nlist(n), n), d, min(PQ_CODE_SIZES)), n, d)
    raise ValueError(
        f"{sizes} cannot fit in {budget_text}: even {min(PQ_CODE_SIZES)}-byte PQ codes need ~{_bytes(smallest)}; "
        "raise --memory-budget or shard the gallery"
    )


def _rejected(too_big: list[str]) -> str:
    """The rejected candidates, the PQ ladder summarised: the reason stays one readable line."""
    head = [item for item in too_big if "PQ" not in item or "fs," in item]
    pq = [item for item in too_big if item not in head]
    if pq:
        head.append(f"{len(pq)} larger PQ code size{'s' if len(pq) > 1 else ''}")
    return ", ".join(head)


def training_sample_size(factory: str, num_vectors: int) -> int:
    """How many vectors to train ``factory`` on, at most ``num_vectors``; 0 for types without training.

    IVF k-means gets ``TRAIN_POINTS_PER_CENTROID`` (64) points per list, never fewer than FAISS's
    warning level of 39; PQ codebooks get 256 points per centroid of each sub-quantiser (65,536 for
    8-bit codes, FAISS's own subsampling cap); SQ, OPQ and PCA get the same 65,536. The largest
    need wins, since one sample trains every stage of a composite index.
    """
    n = max(int(num_vectors), 0)
    parts = _parse(factory)
    need = 0
    if parts.nlist is not None:
        need = max(need, TRAIN_POINTS_PER_CENTROID * parts.nlist)
    if parts.pq is not None:
        need = max(need, MAX_POINTS_PER_CENTROID * 2**parts.pq_bits)
    if parts.sq_bits is not None or parts.opq or parts.other_trained or (parts.refine or "Flat") != "Flat":
        need = max(need, DEFAULT_TRAINING_SAMPLE)
    return min(n, need)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes in a size written for ``--memory-budget``: "2GB", "500MB", "1.5G", "512MiB", "1000000".

    Units are decimal (kB, MB, GB, TB, as ``choose_factory`` prints them) or binary with an "i"
    (KiB, MiB, GiB, TiB); a bare number is bytes.

    Raises:
        ConfigError: text that is not a positive size.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"invalid size {text!r}: expected a number and a unit, like 2GB, 500MB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    binary = "i" in unit
    prefix = unit.rstrip("b").rstrip("i")
    if binary and not prefix:
        raise ConfigError(f"invalid size {text!r}: expected a number and a unit, like 2GB, 500MB or 512MiB")
    scale = 1024 ** "kmgt".index(prefix) * 1024 if binary else _SIZE_UNITS[prefix]
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"invalid size {text!r}: it must be positive")
    return size


@dataclass(frozen=True)
class _Parts:
    nlist: int | None = None
    pq: int | None = None
    pq_bits: int = 8
    sq_bits: int | None = None
    hnsw: int | None = None
    coarse_hnsw: int | None = None
    fast_scan: bool = False
    refine: str | None = None
    opq: bool = False
    other_trained: bool = False


_IVF = re.compile(r"^IVF(\d+)")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?(fs)?")
_REFINE = re.compile(r"^(?:RFlat|Refine\((\w+)\))$")
_SQ = re.compile(r"^SQ(\d+|fp16|bf16)")
_HNSW = re.compile(r"^HNSW(\d+)")
#: Components that need training but are not modelled in the memory estimate (PCA, ITQ, LSH, RaBitQ ...).
_TRAINED = re.compile(r"^(PCA|ITQ|LSH|RaBitQ|RR|Residual|RQ|LSQ|PRQ|PLSQ)")


def _parse(factory: str) -> _Parts:
    """The parts of a factory string that matter for memory and training; unknown parts are ignored."""
    fields: dict[str, object] = {}
    for component in factory.replace(" ", "").split(","):
        if match := _IVF.match(component):
            fields["nlist"] = int(match.group(1))
            if coarse := re.match(r"^IVF\d+_HNSW(\d+)", component):  # "IVF4096_HNSW32": graph over the centroids
                fields["coarse_hnsw"] = int(coarse.group(1))
        elif match := _REFINE.match(component):
            fields["refine"] = match.group(1) or "Flat"
        elif component.startswith("OPQ"):
            fields["opq"] = True
        elif match := _PQ.match(component):
            fields["pq"] = int(match.group(1))
            fields["pq_bits"] = int(match.group(2) or 8)
            fields["fast_scan"] = bool(match.group(3))
        elif match := _SQ.match(component):
            fields["sq_bits"] = 16 if match.group(1) in ("fp16", "bf16") else int(match.group(1))
        elif match := _HNSW.match(component):
            fields["hnsw"] = int(match.group(1))
            if "_" in component:  # "HNSW32_PQ8": graph over PQ codes
                tail = component.split("_", 1)[1]
                if pq := _PQ.match(tail):
                    fields["pq"] = int(pq.group(1))
                    fields["pq_bits"] = int(pq.group(2) or 8)
                elif tail.startswith("SQ"):
                    fields["sq_bits"] = 8
        elif _TRAINED.match(component):
            fields["other_trained"] = True
    return _Parts(**fields)  # type: ignore[arg-type]


def _count(n: int) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
