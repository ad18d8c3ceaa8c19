"""One dynamic partition per training cycle ties its dataset, adapter, evaluation and A/B report together."""

import dagster as dg

cycle_partitions = dg.DynamicPartitionsDefinition(name="cycle")
