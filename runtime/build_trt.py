"""sparsezip-build-trt: build native TensorRT plans for an engine folder, on the device that will run them.

    sparsezip-build-trt engines/shapes-sparsezip      # then: sparsezip-run --backend tensorrt ...

A plan is valid for one GPU model and one TensorRT version, so it is built
where it runs (a Jetson builds its own). Each ONNX graph of the folder becomes
`<graph>-<build id>.plan` with the optimisation profiles of runtime/profiles.py
(vision: one; llm: prefill and decode), strongly typed (fp16 where the ONNX is
fp16, float32 where it is float32). The manifest then records the plans and the
facts they were built under (TensorRT version, GPU, compute capability,
profiles, limits), written last and atomically: a kill at any point leaves the
folder as it was (plus, at worst, an unreferenced plan file) or complete. Plans
of an earlier build are deleted once the new manifest is in place.

Needs the TensorRT Python package and cuda-python (runtime/backends/tensorrt.py
says how to install them); torch-free, like the rest of runtime/.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .backends.tensorrt import import_tensorrt, network_flags
from .cuda import gpu_info
from .engine import load_engine
from .errors import EngineError, UserError
from .manifest import (PREFILL_GRAPH, SELECTOR_GRAPH, TRUNK_GRAPH, VISION_GRAPH, Manifest, Plan, Profile,
                       TensorRTInfo, artifact_entries, write_manifest)
from .profiles import graph_profiles

# In this order, those the folder has (a vision graph, or a split engine's trunk and selector).
GRAPHS = (VISION_GRAPH, TRUNK_GRAPH, SELECTOR_GRAPH, "llm", PREFILL_GRAPH)


def build_plans(folder: Path, workspace_gib: float = 4.0, device_id: int = 0,
                say: Callable[[str], None] = print) -> Manifest:
    """Build every graph's plan into `folder` and record them in its manifest; returns the new manifest."""
    trt = import_tensorrt()
    gpu = gpu_info(device_id)
    engine = load_engine(folder)
    manifest = engine.manifest
    say(f"TensorRT {trt.__version__} on {gpu.name} (compute {gpu.compute_capability}); limits: "
        f"{manifest.serving_limits}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    build_id = f"{time.time_ns() // 1_000_000:x}"
    plans, written, t0 = {}, [], time.perf_counter()
    try:
        graphs = [g for g in GRAPHS if g in manifest.graphs]
        for step, graph in enumerate(graphs, 1):
            spec = manifest.graphs[graph]
            profiles = graph_profiles(manifest, graph, native=True)
            say(f"[{step}/{len(graphs)}] {spec.file} -> {graph}.plan ({len(profiles)} optimisation "
                f"profile{'s' if len(profiles) > 1 else ''}); this takes minutes")
            t1 = time.perf_counter()
            blob = _build_one(trt, builder, logger, engine.path(spec.file), profiles, workspace_gib, say)
            name = f"{graph}-{build_id}.plan"
            partial = folder / f".{name}.partial"
            written.append(partial)
            with open(partial, "wb") as f:
                f.write(blob)
            os.replace(partial, folder / name)
            written.append(folder / name)
            plans[graph] = Plan(name, spec.file, profiles)
            say(f"      {name}: {(folder / name).stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t1:.0f} s")
        old = manifest.tensorrt.plans.values() if manifest.tensorrt is not None else ()
        artifacts = {k: v for k, v in manifest.artifacts.items() if k not in {p.file for p in old}}
        artifacts.update(artifact_entries(folder, [p.file for p in plans.values()]))
        info = TensorRTInfo(trt.__version__, gpu.name, gpu.compute_capability, plans, manifest.serving_limits,
                            round(time.perf_counter() - t0, 1))
        updated = dataclasses.replace(manifest, tensorrt=info, artifacts=artifacts)
        write_manifest(folder, updated)  # the commit point
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for plan in old:
        if plan.file not in updated.artifacts:
            (folder / plan.file).unlink(missing_ok=True)
    return updated


def _build_one(trt, builder, logger, onnx_path: Path, profiles: Sequence[Profile], workspace_gib: float,
               say: Callable[[str], None]):
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # finds llm.onnx.data beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: "
                          f"{errors[0] if errors else 'no reason given'} (sparsezip-lint-trt lists every node "
                          "it would refuse)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    for profile in profiles:
        shapes = builder.create_optimization_profile()
        for name, r in profile.items():
            shapes.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(shapes)
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError(f"TensorRT could not build {onnx_path.name} (its log above says why)")
    return blob


def _progress_monitor(trt, say: Callable[[str], None]):
    """Top-level build phases as they start and end (IProgressMonitor, TensorRT 10+); None where absent."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.started[phase_name] = time.perf_counter()
                say(f"      {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            if phase_name in self.started:
                say(f"      {phase_name} done in {time.perf_counter() - self.started.pop(phase_name):.0f} s")

    return Monitor()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="sparsezip-build-trt", description=__doc__.split("\n\n")[0])
    p.add_argument("engine", type=Path, help="engine folder (export/build.py's output)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace (default: 4)")
    p.add_argument("--device-id", type=int, default=0, help="GPU to build for (default: 0)")
    args = p.parse_args(argv)
    if not 0 < args.workspace_gib <= 1024:
        p.error(f"--workspace-gib must be in (0, 1024], got {args.workspace_gib}")
    try:
        updated = build_plans(args.engine, args.workspace_gib, args.device_id)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the engine folder is as it was", file=sys.stderr)
        return 1
    print(f"plans: {', '.join(p.file for p in updated.tensorrt.plans.values())} in {args.engine}; run with "
          f"sparsezip-run --engine {args.engine} --backend tensorrt ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
