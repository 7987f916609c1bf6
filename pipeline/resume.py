"""Which of the planned units a run does against what its output holds already.

- Units committed are skipped; units marked failed too, unless the run retries them.
- A redo of error rows (`redo_errors`): each committed unit with error rows of the kinds asked is done again, narrowed
  to those rows (WorkUnit.redo); the worker merges them back among the rows kept (sink.whole_output) and the unit is
  committed again whole, so each input row still has exactly one output row per instruction.
- An output's parts keep one schema: new parts take that of the parts committed (WorkUnit.part_schema), so an output
  begun by an earlier version, whose rows lack a newer column, stays one table for every reader.
- Unit ids come from the shards' content; outputs written before that named their units after the shards' locations
  (shards.legacy_unit_id): a unit committed under its old id keeps it, so the old output resumes without redoing it.
- A row group larger than a unit is cut into row ranges, one unit each; an output begun before that committed (or
  failed) the row group as one unit, which keeps that identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from blipbatch.schemas import ERROR_KINDS

from .job import PipelineError
from .shards import ShardChanged, WorkUnit, legacy_unit_id
from .sink import committed_units, error_positions, failed_units, part_schema, progress_records


@dataclass(frozen=True)
class RunPlan:
    units: list[WorkUnit]  # every planned unit, under the id its output knows it by
    pending: list[WorkUnit]  # what this run does: units not committed (nor failed, unless retried), then redos
    committed: set[str]  # ids of the units committed before this run

    @property
    def skipped(self) -> int:
        """Planned units this run leaves as they are."""
        return len(self.units) - sum(unit.redo is None for unit in self.pending)

    def output_rows(self, per_input_row: int) -> int:
        """Output rows this run writes (a redo: only the rows it does again)."""
        return sum(unit.num_rows * per_input_row if unit.redo is None else len(unit.redo) for unit in self.pending)


def redo_kinds(kinds: Collection[str]) -> frozenset[str]:
    """The error kinds a redo takes: those named, or every kind when none is."""
    unknown = sorted(set(kinds) - set(ERROR_KINDS))
    if unknown:
        raise PipelineError(
            f"--redo-errors: unknown error kind(s) {', '.join(unknown)}; the kinds are {', '.join(ERROR_KINDS)}"
        )
    return frozenset(kinds or ERROR_KINDS)


def known_ids(units: Sequence[WorkUnit], committed: Collection[str]) -> list[WorkUnit]:
    """The units, each under the id it was committed by: its content id, or the location id older outputs used; the
    row ranges of a row group that an older output committed whole (before row groups were cut) are that one unit."""
    return [
        unit
        if unit.unit_id in committed or legacy_unit_id(unit) not in committed
        else dataclasses.replace(unit, unit_id=legacy_unit_id(unit))
        for unit in _whole_where_known(units, committed)
    ]


def _whole_where_known(units: Sequence[WorkUnit], known: Collection[str]) -> list[WorkUnit]:
    """The units, with the row ranges of each row group whose whole-group unit is known (by either id) joined back
    into that unit."""
    ranges: dict[str, list[WorkUnit]] = {}
    for unit in units:
        if unit.group_range is not None:
            ranges.setdefault(unit.whole_group_id, []).append(unit)
    joined = {}
    for whole_id, parts in ranges.items():
        whole = dataclasses.replace(
            parts[0], unit_id=whole_id, num_rows=sum(p.num_rows for p in parts), group_range=None
        )
        if whole_id in known or legacy_unit_id(whole) in known:
            joined[whole_id] = whole
    out: list[WorkUnit] = []
    for unit in units:
        if unit.group_range is None or unit.whole_group_id not in joined:
            out.append(unit)
        elif unit.group_range[0] == 0:
            out.append(joined[unit.whole_group_id])
    return out


def plan_run(
    output: str, planned: Sequence[WorkUnit], retry_failed: bool = False, redo_errors: Collection[str] | None = None
) -> RunPlan:
    """What a run over `planned` does in `output`; `redo_errors`: None for no redo, else the kinds (empty: all)."""
    committed = committed_units(output)
    failed = set(failed_units(output))
    units = known_ids(planned, committed | failed)
    skip = committed if retry_failed else committed | failed
    pending = [unit for unit in units if unit.unit_id not in skip]
    if redo_errors is not None:
        kinds = redo_kinds(redo_errors)
        records = {record.unit_id: record for record in progress_records(output)}
        for unit in units:
            record = records.get(unit.unit_id)
            if record is None or not kinds & set(record.errors_by_kind):
                continue
            pending.append(dataclasses.replace(unit, redo=error_positions(output, record, kinds)))
    if committed:  # new parts take the schema of those there (an output begun by an earlier version keeps its own)
        schema = part_schema(output, min(committed))
        pending = [dataclasses.replace(unit, part_schema=schema) for unit in pending]
    return RunPlan(units, pending, committed)


def unfinished_shards(output: str, planned: Sequence[WorkUnit]) -> list[str]:
    """The shards with a unit not committed yet: those a run still reads whole."""
    committed = committed_units(output)
    return list(dict.fromkeys(unit.shard for unit in known_ids(planned, committed) if unit.unit_id not in committed))


def unmatched_units(committed: Collection[str], units: Sequence[WorkUnit]) -> list[str]:
    """Committed units that match no planned unit: their shard was removed or changed, or the input moved to other
    content. Their rows stay in the output."""
    return sorted(set(committed) - {unit.unit_id for unit in known_ids(units, committed)})


def rewritten_shards(output: str, units: Sequence[WorkUnit], committed: Collection[str]) -> dict[str, list[str]]:
    """Shards rewritten in place since units of their earlier content were committed: shard -> those unit ids.

    A unit is known by its shard's content, so a shard rewritten at the same location is a new shard to a run: its
    rows would be committed again beside the earlier content's, repeating their ids. Only committed units that match
    no planned unit are read (usually none)."""
    unmatched = unmatched_units(committed, units)
    if not unmatched:
        return {}
    locations = {unit.shard for unit in units}
    found: dict[str, list[str]] = {}
    for record in progress_records(output, set(unmatched)):
        if record.shard in locations:
            found.setdefault(record.shard, []).append(record.unit_id)
    return found


def check_rewritten(output: str, units: Sequence[WorkUnit], committed: Collection[str]) -> None:
    """Refuse a run over shards rewritten since some of their units were committed (rewritten_shards)."""
    found = rewritten_shards(output, units, committed)
    if found:
        shard, unit_ids = next(iter(found.items()))
        raise ShardChanged(
            f"{len(found)} shard(s) rewritten in place since units of their earlier content were committed, e.g. "
            f"{shard} ({len(unit_ids)} unit(s): {', '.join(unit_ids[:3])}{' ...' if len(unit_ids) > 3 else ''}); "
            "its new content would commit its rows again beside the earlier ones. Put the earlier content back, or "
            "write to a new output, or pass --force to process the new content anyway (the earlier rows stay)"
        )


def redo_hint(errors_by_kind: Mapping[str, int]) -> str | None:
    """The command that redoes the error rows of an output, after their cause is fixed; None without errors."""
    if not errors_by_kind:
        return None
    kinds = " ".join(sorted(errors_by_kind))
    return f"blipbatch run SPEC --redo-errors {kinds}  (SPEC: the job's spec; or no kinds for every error row)"
