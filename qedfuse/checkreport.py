"""The result of a check (:func:`~qedfuse.check.check_image`) and how it is shown.

:class:`CheckReport` holds qemu-img check's counts with their names and meanings, the exit
code they give, a one-line summary for logs, and ``qemu-img check``'s JSON object and human
text.  No I/O: the walk that fills it is :mod:`qedfuse.check`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckReport:
    """The result of :func:`~qedfuse.check.check_image` (qemu-img's count names and meanings)."""

    image_size: int
    cluster_size: int
    total_clusters: int  # ceil(image_size / cs)
    allocated_clusters: int  # L2 entries that are data offsets (valid or not)
    fragmented_clusters: int  # per table, allocated entries not at previous + cs
    leaks: int  # unreferenced clusters after the header (after repair: remaining)
    leaks_fixed: int
    corruptions: int  # remaining after repair
    corruptions_fixed: int
    check_errors: int  # I/O errors during the check
    need_check: bool  # NEED_CHECK bit on disk after the check
    messages: list[str] = field(default_factory=list)

    def exit_code(self) -> int:
        """qemu-img's: 1 check incomplete, 2 corruptions, 3 only leaks, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def summary_line(self) -> str:
        """One line for logs: ``2 corruptions fixed, 1 leaked cluster reclaimed, 0 remaining``."""
        parts: list[str] = []
        if self.corruptions_fixed:
            parts.append(f"{plural(self.corruptions_fixed, 'corruption')} fixed")
        if self.leaks_fixed:
            parts.append(f"{plural(self.leaks_fixed, 'leaked cluster')} reclaimed")
        remaining: list[str] = []
        if self.corruptions:
            remaining.append(plural(self.corruptions, "corruption"))
        if self.leaks:
            remaining.append(plural(self.leaks, "leaked cluster"))
        if self.check_errors:
            remaining.append(plural(self.check_errors, "check error"))
        if not parts and not remaining:
            return "no errors found"
        if parts:
            parts.append(f"{' and '.join(remaining)} remaining" if remaining else "0 remaining")
        else:
            parts.append(" and ".join(remaining) + " found")
        return ", ".join(parts)

    def to_json(self, filename: str | None = None) -> dict[str, object]:
        """``qemu-img check --output=json``'s object: zero optional counts are omitted.

        The caller may add ``"filename"`` (or pass it here to get qemu-img's key order).
        """
        out: dict[str, object] = {}
        if self.total_clusters:
            out["total-clusters"] = self.total_clusters
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        out["check-errors"] = self.check_errors
        if self.leaks:
            out["leaks"] = self.leaks
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        if self.allocated_clusters:
            out["allocated-clusters"] = self.allocated_clusters
        if filename is not None:
            out["filename"] = filename
        out["format"] = "qed"
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        return out

    def human_text(self, filename: str) -> str:
        """qemu-img check's human output, preceded by one line per finding."""
        lines: list[str] = []
        if self.corruptions_fixed or self.leaks_fixed:
            lines += [
                "The following inconsistencies were found and repaired:",
                "",
                f"    {self.leaks_fixed} leaked clusters",
                f"    {self.corruptions_fixed} corruptions",
                "",
                "Double checking the fixed image now...",
            ]
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines += [
                    "",
                    f"{self.corruptions} errors were found on the image.",
                    "Data may be corrupted, or further writes to the image may corrupt it.",
                ]
            if self.leaks:
                lines += [
                    "",
                    f"{self.leaks} leaked clusters were found on the image.",
                    "This means waste of disk space, but no harm to data.",
                ]
            if self.check_errors:
                lines += [
                    "",
                    f"{self.check_errors} internal errors have occurred during the check.",
                ]
        if self.total_clusters and self.allocated_clusters:
            lines.append(
                f"{self.allocated_clusters}/{self.total_clusters} = "
                f"{self.allocated_clusters * 100.0 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:.2f}% fragmented, "
                "0.00% compressed clusters"
            )
        findings = [f"{filename}: {m}" for m in self.messages]
        if findings and lines[0]:
            findings.append("")
        return "\n".join(findings + lines) + "\n"


def plural(n: int, noun: str) -> str:
    """``1 cluster``, ``2 clusters``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = ["CheckReport", "plural"]
