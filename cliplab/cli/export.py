"""``cliplab export-onnx``: write a model's towers as ONNX graphs (optionally int8), with a parity check."""

from __future__ import annotations

import click

from .app import emit, main
from .common import fail, warnings_to_stderr


@main.command("export-onnx")
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--towers", default="image,text", show_default=True, help="Towers to export, comma-separated.")
@click.option("--int8", "int8", is_flag=True, help="Also write dynamic int8 graphs (image.int8.onnx, text.int8.onnx).")
@click.option("--opset", type=click.IntRange(14), default=None, help="ONNX opset [default: the exporter's].")
@click.option("--check", is_flag=True,
              help="Compare ONNX Runtime with the PyTorch model on random inputs (max abs diff, cosine).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_onnx_cmd(model: str, out_dir: str, towers: str, int8: bool, opset: int | None, check: bool, as_json: bool):
    """Export MODEL's towers to ONNX in OUT_DIR; load them with cliplab.export.load_onnx(OUT_DIR).

    MODEL: a pretrained name (cliplab models), a checkpoint file or directory, or an architecture name (seeded
    random weights, for smoke tests).

    \b
    Examples:
      cliplab export-onnx shapes-tiny shapes-onnx --int8 --check
      cliplab export-onnx ViT-B-32.safetensors vitb32-onnx --towers text
    """
    from ..export import MissingDependencyError

    try:
        data = _export(model, out_dir, towers, int8, opset, check)
    except MissingDependencyError as e:
        fail(str(e), 1)

    def render(d):
        click.echo(f"exported {', '.join(d['towers'])} of {d['model']} to {d['out_dir']} (opset {d['opset']}"
                   + (", with int8 graphs)" if d["int8"] else ")"))
        for variant, report in d.get("parity", {}).items():
            for tower, r in report.items():
                click.echo(f"  parity {variant} {tower}: max abs diff {r['max_abs_diff']:.2e}, "
                           f"cosine min {r['min_cosine']:.6f} mean {r['mean_cosine']:.6f}")

    emit(data, as_json, render)


def _export(model: str, out_dir: str, towers: str, int8: bool, opset: int | None, check: bool) -> dict:
    from ..export import check_parity, export_onnx, load_onnx
    from ..export.deps import require
    from ..export.manifest import normalize_towers, read_manifest
    from ..pipeline.modelref import resolve_model

    for name in ("onnx", "onnxscript", "onnxruntime"):  # fail before loading a large model, not after
        require(name)
    towers = normalize_towers(towers)
    with warnings_to_stderr():
        torch_model, info = resolve_model(model)
    source = {"kind": info["kind"], "source": info["source"], "fingerprint": info["fingerprint"]}
    if "seed" in info:
        source["seed"] = info["seed"]
    directory = export_onnx(torch_model, out_dir, towers=towers, opset=opset, quantize="int8" if int8 else None,
                            source=source)
    manifest = read_manifest(directory)
    data = {"out_dir": str(directory), "model": manifest["model"], "towers": list(towers), "opset": manifest["opset"],
            "int8": int8, "files": sorted(p.name for p in directory.iterdir())}
    if check:
        variants = {"fp32": False, "int8": True} if int8 else {"fp32": False}
        data["parity"] = {name: check_parity(torch_model, load_onnx(directory, quantized=quantized))
                          for name, quantized in variants.items()}
    return data
