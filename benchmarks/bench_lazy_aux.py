"""Memory and time of connecting a ViT-B to a big language model read lazily from disk.

Writes a random-init Llama-style checkpoint (>= 1.5B parameters, bf16, sharded, with
``model.safetensors.index.json`` and ``config.json``) to a temporary folder one shard at a time,
never holding the whole model; then, each in a fresh subprocess (peak RSS is per process):

  lazy       pathway.connect(vit_b, folder): the aux built on the meta device, of each matched tensor
             only the rows the selection keeps read (safetensors slices)
  whole      the same, reading each matched tensor whole (as before sliced reads), for comparison
  in_memory  AutoModel.from_pretrained(folder) then pathway.connect(vit_b, aux)

Both use weight selection (on_shape_mismatch='select', depth='first': Xu et al.'s first-N layers)
and a bf16 ViT-B target, so they differ only in how the aux is held. Prints peak RSS (``VmHWM``)
above the interpreter with its imports, open and connect time, bytes read against bytes kept (the
selected aux tensors), and the ratios; deletes the folder after. Asserts nothing.

    python benchmarks/bench_lazy_aux.py [--layers 24] [--hidden 2048] [--intermediate 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("lazy", "whole", "in_memory")
LAZY = ("lazy", "whole")


def write_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                     vocab: int, per_shard: int) -> int:
    """A Llama-style checkpoint in bf16, ``per_shard`` layers per shard; returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    head_dim = hidden // heads

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    groups = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    weight_map, total, params = {}, 0, 0
    for k, group in enumerate([None, *groups]):
        if group is None:
            shard = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                     "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        else:
            shard = {}
            for i in group:
                p = f"model.layers.{i}."
                shard |= {p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                          p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                          p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                          p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                          p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                          p + "mlp.up_proj.weight": rand(intermediate, hidden),
                          p + "mlp.down_proj.weight": rand(hidden, intermediate),
                          p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                          p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        name = f"model-{k + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        params += sum(t.numel() for t in shard.values())
        del shard
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return params


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    """This process image's peak RSS: ``VmHWM``, not ``ru_maxrss``, which survives ``fork`` + ``exec``.

    A child of this script would report the parent's peak (the checkpoint writer's) as its own in
    ``ru_maxrss``: measured here, 721 MiB instead of 422 MiB above imports for the same lazy connect.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, folder: str) -> dict:
    """One mode in this process: connect a bf16 ViT-B to the checkpoint; peak RSS and times."""
    import timm
    import transformers  # noqa: F401  (imported by both modes, so the import cost is in the baseline)

    import pathway
    import pathway.reads
    from pathway.source import open_aux

    torch.set_num_threads(1)
    base = _rss_mib()
    with torch.device("meta"):     # built in bf16 directly: an fp32 copy would set the peak by itself
        target = timm.create_model("vit_base_patch16_224", pretrained=False)
    target = target.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for p in target.parameters():
            p.normal_(0, 0.02)     # random init, every page written
    target_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    options = {"on_shape_mismatch": "select", "depth": "first", "allow_partial": True}
    start = time.perf_counter()
    if mode in LAZY:
        aux = open_aux(folder)
        if mode == "whole":   # every matched tensor read whole, selected in memory (the reads before slicing)
            pathway.reads.rows_needed = lambda pair, selected, shapes: dict.fromkeys(
                selected.aux if selected is not None else pair.aux)
    else:
        aux = transformers.AutoModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter()
    report = pathway.connect(target, aux, **options)
    done = time.perf_counter()
    selected = sum(p.aux_weight.numel() * p.aux_weight.element_size()
                   for *_, pathways in pathway.modules.pathway_sites(target) for p in pathways)
    peak = _peak_rss_mib()
    return {"mode": mode, "import_rss_mib": base, "peak_rss_mib": peak, "above_imports_mib": peak - base,
            "target_mib": target_bytes / 2**20, "selected_mib": selected / 2**20,
            "read_mib": (aux.bytes_read / 2**20) if mode in LAZY else None,
            "tensors_read": len(aux.tensors_read) if mode in LAZY else None,
            "open_s": loaded - start, "connect_s": done - loaded, "total_s": done - start,
            "pairs": len(report.pairs), "coverage": list(report.coverage),
            "example": next(f"{p.target} <- {p.source} [{p.transform}]" for p in report.pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers-per-shard", type=int, default=4)
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    torch.set_num_threads(1)
    per_layer = (2 * args.hidden * args.hidden + 2 * args.hidden * args.hidden * args.kv_heads // args.heads
                 + 3 * args.hidden * args.intermediate)
    need = 2 * (args.layers * per_layer + 2 * args.vocab * args.hidden)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < 1.5 * need:
        sys.exit(
            f"{tempfile.gettempdir()} has {free / 2**30:.1f} GiB free; the checkpoint needs {need / 2**30:.1f} GiB"
        )
    folder = Path(tempfile.mkdtemp(prefix="pathway-bench-lazy-"))
    try:
        start = time.perf_counter()
        params = write_checkpoint(folder, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads,
                                  args.vocab, args.layers_per_shard)
        on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"checkpoint: {params / 1e9:.2f}B parameters, bf16, {len(list(folder.glob('*.safetensors')))} shards, "
              f"{on_disk / 2**30:.2f} GiB, written in {time.perf_counter() - start:.0f} s to {folder}")
        results = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--measure", mode, str(folder)], check=True,
                                 capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder)
    lazy, whole, full = results["lazy"], results["whole"], results["in_memory"]
    print(f"target ViT-B/16 bf16 {lazy['target_mib']:.0f} MiB; selected aux tensors {lazy['selected_mib']:.0f} MiB; "
          f"{lazy['pairs']} pairs, coverage {lazy['coverage']}; e.g. {lazy['example']}")
    print(f"{'mode':<10} {'peak RSS':>10} {'above imports':>14} {'open/load':>10} {'connect':>9} {'read':>10}")
    for r in (lazy, whole, full):
        read = f"{r['read_mib']:.0f} MiB" if r["read_mib"] is not None else "all"
        print(f"{r['mode']:<10} {r['peak_rss_mib']:>7.0f} MiB {r['above_imports_mib']:>10.0f} MiB "
              f"{r['open_s']:>9.2f}s {r['connect_s']:>8.2f}s {read:>10}")
    constant = lazy["above_imports_mib"] - lazy["target_mib"] - lazy["selected_mib"]
    print(f"lazy: {lazy['tensors_read']} tensors read ({lazy['read_mib'] / (on_disk / 2**20):.1%} of the checkpoint); "
          f"peak above imports = target + selected + {constant:.0f} MiB")
    for r in (lazy, whole):
        print(f"{r['mode']}: bytes read / bytes kept = {r['read_mib']:.0f} / {r['selected_mib']:.0f} MiB "
              f"= {r['read_mib'] / r['selected_mib']:.2f}")
    print(f"sliced / whole reads: bytes read {lazy['read_mib'] / whole['read_mib']:.3f}, peak RSS above imports "
          f"{lazy['above_imports_mib'] / whole['above_imports_mib']:.3f}")
    print(f"ratios lazy / in memory: peak RSS above imports "
          f"{lazy['above_imports_mib'] / full['above_imports_mib']:.3f}, "
          f"open + connect time {lazy['total_s'] / full['total_s']:.3f}")


if __name__ == "__main__":
    main()
