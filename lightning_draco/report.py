"""Who lied: per-step records of the ranks the parameter server caught, and the end-of-fit report."""

from __future__ import annotations

from collections import Counter
from typing import Optional

__all__ = ["FaultLedger"]


class FaultLedger:
    """Counts, per rank, the steps at which its gradient was found faulty.

    Every rank keeps an identical ledger (the parameter server broadcasts each outcome), so
    decisions taken from it, such as stopping at ``max_faulty_steps``, agree everywhere.

    Args:
        hostnames: host name of each rank, by rank.
        max_faulty_steps: stop the run once a rank has been caught at more steps than this;
            ``None`` never stops.
    """

    def __init__(self, hostnames: list[str], max_faulty_steps: Optional[int] = None):
        self.hostnames = list(hostnames)
        self.max_faulty_steps = max_faulty_steps
        self.times_caught: Counter[int] = Counter()
        self.first_caught: dict[int, int] = {}
        #: Catches of a rank on a host that no longer runs it after a resume: ``(rank, host, times, first)``.
        #: They are reported, but count towards neither ``max_faulty_steps`` nor quarantine: the rank's
        #: count starts afresh on its new host.
        self.earlier: list[tuple[int, str, int, int]] = []
        self.steps = 0
        self.skipped_steps = 0
        #: Steps that failed and raised (``on_decode_failure="raise"``): the fit stopped there.
        self.failed_steps = 0

    def record(
        self, step: int, caught: set[int], skipped: bool, decoders: frozenset[int] = frozenset(), failed: bool = False
    ) -> list[str]:
        """Add one step's outcome; return the warnings it warrants (a rank caught for the first time).
        ``decoders``: the caught ranks that were outvoted as decoders (sharded decoding); ``failed``: the step
        failed and the fit stops with its error."""
        self.steps += 1
        self.skipped_steps += int(skipped)
        self.failed_steps += int(failed)
        news = []
        for rank in sorted(caught):
            self.times_caught[rank] += 1
            if rank not in self.first_caught:
                self.first_caught[rank] = step
                what = ("was outvoted as a decoder (it passed on a decoded shard the other decoders did not), or sent"
                        " a faulty gradient," if rank in decoders else "sent a faulty gradient")
                then = "the step was skipped" if skipped else "the step failed" if failed else "the step decoded without it"
                news.append(
                    f"DRACO: rank {rank} on host {self.hostname(rank)} {what} at step {step}; what it sent was set"
                    f" aside and {then}. Its count is logged as draco/times_caught/rank_{rank}."
                )
        return news

    def hostname(self, rank: int) -> str:
        return self.hostnames[rank] if rank < len(self.hostnames) else "?"

    def over_threshold(self) -> list[int]:
        """Ranks caught at more than ``max_faulty_steps`` steps."""
        if self.max_faulty_steps is None:
            return []
        return sorted(r for r, n in self.times_caught.items() if n > self.max_faulty_steps)

    def should_log(self, step: int, caught: set[int], skipped: bool, every_n_steps: int) -> bool:
        """Log every ``every_n_steps`` steps, and at every step that caught a rank or was skipped."""
        return bool(caught) or skipped or step % max(every_n_steps, 1) == 0

    def stop_message(self) -> Optional[str]:
        """Why the run must stop (a rank caught at more than ``max_faulty_steps`` steps), or ``None``."""
        over = self.over_threshold()
        if not over:
            return None
        return (
            f"DRACO: ranks {over} were caught at more than max_faulty_steps={self.max_faulty_steps} steps;"
            " the trainer stops after this step (once min_steps and min_epochs, where set, are met)."
        )

    def metrics(self, caught: set[int]) -> dict[str, float]:
        """What to log for the step just recorded."""
        values = {"draco/caught": float(len(caught)), "draco/skipped_steps": float(self.skipped_steps)}
        for rank, count in self.times_caught.items():
            values[f"draco/times_caught/rank_{rank}"] = float(count)
        return values

    def counts(self) -> dict[int, int]:
        """Rank -> number of steps at which it was caught (only ranks caught at least once)."""
        return dict(sorted(self.times_caught.items()))

    def summary(self) -> str:
        """The end-of-fit report: rank, host, times caught."""
        # ``steps`` counts the skipped and failed steps too: their decode failed (or gave a non-finite gradient).
        decoded = self.steps - self.skipped_steps - self.failed_steps
        failed = f", {self.failed_steps} failed" if self.failed_steps else ""
        lines = [f"DRACO report: {decoded} steps decoded, {self.skipped_steps} skipped{failed}."]
        rows = self.caught()
        if not rows:
            lines.append("No rank was caught sending a faulty gradient.")
            return "\n".join(lines)
        width = max(len("host"), *(len(row["host"]) for row in rows))
        lines.append(f"{'rank':>4}  {'host':<{width}}  times caught  first at step")
        for row in rows:
            rank = row["rank"]
            note = f"  (before a resume; rank {rank} now runs on {self.hostname(rank)})" if row["before_resume"] else ""
            count, first = row["times_caught"], row["first_at_step"]
            lines.append(f"{rank:>4}  {row['host']:<{width}}  {count:>12}  {first:>13}{note}")
        return "\n".join(lines)

    def caught(self) -> list[dict]:
        """Every rank caught, with the host it ran on: ``rank``, ``host``, ``times_caught``, ``first_at_step`` and
        ``before_resume`` (caught on a host the rank no longer runs on, which ``counts`` leaves out). What a
        run's summary should record: after a requeue onto other nodes, ``counts`` alone forgets the node that lied.
        """
        rows = [{"rank": rank, "host": self.hostname(rank), "times_caught": count,
                 "first_at_step": self.first_caught[rank], "before_resume": False}
                for rank, count in sorted(self.times_caught.items())]
        rows += [{"rank": rank, "host": host, "times_caught": count, "first_at_step": first, "before_resume": True}
                 for rank, host, count, first in self.earlier]
        return rows

    def state_dict(self) -> dict:
        return {
            "times_caught": dict(self.times_caught),
            "first_caught": dict(self.first_caught),
            "hostnames": list(self.hostnames),
            "earlier": [list(entry) for entry in self.earlier],
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "failed_steps": self.failed_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved ledger. A caught rank that now runs on another host than when it was saved (a
        node replaced between a failure and the resume) keeps its catches under the old host, in
        ``earlier``; its count starts afresh, so the replacement is neither stopped nor quarantined for them."""
        self.times_caught = Counter({int(k): int(v) for k, v in state["times_caught"].items()})
        self.first_caught = {int(k): int(v) for k, v in state["first_caught"].items()}
        self.earlier = [(int(r), str(h), int(n), int(f)) for r, h, n, f in state.get("earlier", [])]
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.failed_steps = int(state.get("failed_steps", 0))  # absent from checkpoints of earlier versions
        saved = state.get("hostnames", [])
        for rank in sorted(self.times_caught):
            before = saved[rank] if rank < len(saved) else None
            if before is not None and rank < len(self.hostnames) and before != self.hostnames[rank]:
                self.earlier.append((rank, before, self.times_caught.pop(rank), self.first_caught.pop(rank)))
