"""Choose a FAISS index type from the gallery size and a memory budget, following FAISS's own guidance.

The rules transcribe the FAISS wiki page "Guidelines to choose an index"
(https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index), in the order the page
asks its questions: exact search while it is cheap, then HNSW while memory is not a concern, then
IVF with decreasing storage per vector (uncompressed, 8-bit scalar quantisation, product
quantisation) as the memory budget tightens. autofaiss follows the same page; it is a reference
only, since it pins numpy < 2. Everything here is pure arithmetic on counts and bytes: nothing
imports faiss, so a choice can be printed, tested and recorded in the manifest before any index
exists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from retrieval.config import ConfigError

__all__ = [
    "FactoryChoice",
    "choose_factory",
    "estimate_index_bytes",
    "ivf_nlist",
    "parse_size",
    "training_sample_size",
]

#: Below this many vectors exact search wins: a brute-force scan costs about a millisecond per
#: query, and no training sample or tuning is needed. The wiki's "Will you perform few searches?" /
#: "Do you need exact results?" answer is "Flat"; autofaiss uses a similar cut-off.
EXACT_MAX_VECTORS = 50_000
#: HNSW is "the best option if you have a lot of RAM or the dataset is small" (wiki, "Is memory a
#: concern? If not"); its build time grows quickly with N, so above this size IVF is chosen even
#: when HNSW would fit.
HNSW_MAX_VECTORS = 1_000_000
#: Links per vector of the HNSW graph (wiki: 4 <= M <= 64; 32 is its usual example and autofaiss's default).
HNSW_M = 32
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

    Per vector: Flat 4d, HNSW 4d + 8M (the wiki's formula), IVF-Flat 4d, SQ8 d, PQm m bytes; plus
    8 bytes of id in IVF lists or ``IDMAP_BYTES_PER_VECTOR`` for the id map of other types; plus
    the IVF centroids, PQ codebooks and OPQ matrix.
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
    fixed = 4 * d * (parts.nlist or 0)
    if parts.pq is not None:
        fixed += 4 * d * 2**parts.pq_bits
    if parts.opq:
        fixed += 4 * d * d
    return math.ceil(n * per_vector + fixed)


def choose_factory(num_vectors: int, dim: int, memory_budget_bytes: int | None = None) -> FactoryChoice:
    """The FAISS index type for ``num_vectors`` ``dim``-d vectors within ``memory_budget_bytes``.

    Rules, first match wins (see the module docstring for their source):

    ==============  ==========================================  ==========================
    factory         when                                        FAISS wiki answer
    ==============  ==========================================  ==========================
    Flat            N < 50k and it fits                         exact / few searches
    HNSW32          N < 1M and 4d + 256 B per vector fits       memory no concern
    IVFk,Flat       it fits                                     memory "somewhat" a concern
    IVFk,SQ8        d + 8 B per vector fits                     memory "quite important"
    IVFk,PQmnp      the largest m (bytes/vector) that fits      memory "very important"
    ==============  ==========================================  ==========================

    with k = ``ivf_nlist(N)`` (4 sqrt(N), 16 sqrt(N) from 10M with an HNSW coarse quantiser).
    Without a budget memory is not a concern: Flat, then HNSW32, then IVF-Flat.

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

    too_big: list[str] = []

    def fits(factory: str) -> bool:
        est = estimate_index_bytes(factory, n, d)
        if budget is None or est <= budget:
            return True
        too_big.append(f"{factory} ~{_bytes(est)}")
        return False

    def choice(factory: str, why: str) -> FactoryChoice:
        est = estimate_index_bytes(factory, n, d)
        rejected = f" ({', '.join(too_big)} exceed the budget)" if too_big else ""
        reason = f"{sizes}, {budget_text}: {factory} needs ~{_bytes(est)}{rejected}; {why}"
        return FactoryChoice(factory, reason, _parse(factory).nlist, est)

    if n < EXACT_MAX_VECTORS and fits("Flat"):
        return choice("Flat", f"exact search, since below {_count(EXACT_MAX_VECTORS)} vectors a scan is fast")
    hnsw = f"HNSW{HNSW_M}"
    if n < HNSW_MAX_VECTORS and fits(hnsw):
        return choice(hnsw, f"graph search, fast and accurate while memory allows (N < {_count(HNSW_MAX_VECTORS)})")
    nlist = ivf_nlist(n)
    prefix = _ivf_prefix(nlist, n)
    ivf_why = f"{nlist} lists ~ {16 if n >= LARGE_VECTORS else 4} sqrt(N)"
    if n >= HNSW_MAX_VECTORS:
        ivf_why += f"; no HNSW from {_count(HNSW_MAX_VECTORS)} vectors on, where its build time dominates"
    if fits(f"{prefix},Flat"):
        return choice(f"{prefix},Flat", f"inverted file, uncompressed vectors, {ivf_why}")
    if fits(f"{prefix},SQ8"):
        return choice(f"{prefix},SQ8", f"inverted file, 8-bit scalar codes (4x smaller), {ivf_why}")
    candidates = [m for m in PQ_CODE_SIZES if m < d]
    for m in candidates:
        factory = _pq_factory(prefix, d, m)
        if budget is None or estimate_index_bytes(factory, n, d) <= budget:
            if m != candidates[0]:
                too_big.append(f"PQ codes over {m} bytes")
            return choice(factory, f"inverted file, {m}-byte product-quantised codes, {ivf_why}")
    smallest = estimate_index_bytes(_pq_factory(prefix, d, min(PQ_CODE_SIZES)), n, d)
    raise ValueError(
        f"{sizes} cannot fit in {budget_text}: even {min(PQ_CODE_SIZES)}-byte PQ codes need ~{_bytes(smallest)}; "
        "raise --memory-budget or shard the gallery"
    )


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
    if parts.sq_bits is not None or parts.opq or parts.other_trained:
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
    opq: bool = False
    other_trained: bool = False


_IVF = re.compile(r"^IVF(\d+)")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?")
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
        elif component.startswith("OPQ"):
            fields["opq"] = True
        elif match := _PQ.match(component):
            fields["pq"] = int(match.group(1))
            fields["pq_bits"] = int(match.group(2) or 8)
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
