"""Slurm: a job file's ``[slurm]`` table, the sbatch scripts made from it, and talking to Slurm.

* :mod:`.settings` checks the table (one-line messages naming file, line and key), applies
  command-line overrides and fills in defaults (:func:`~.settings.resolve`).
* :mod:`.render` fills the templates of the repository's ``slurm/`` folder (shipped in the package
  as ``hpcattn/slurm_templates``) into batch scripts: one job, or a job array plus a merge job.
* :mod:`.client` runs sbatch/scancel/scontrol and reads job records: states, array task ranges,
  the results files a job writes, whether it is complete.

Every value that reaches a script is either checked by :mod:`.settings` (a full match over ASCII
classes, so no newline or other control character gets through) or quoted by :mod:`.render`;
only ``setup`` (shell lines) and ``extra`` (sbatch options) are the user's own text, as written.

Submission computes nothing and never imports the numeric code, the runner or the command line.
"""
from __future__ import annotations

from ..errors import HpcattnError


class SlurmError(HpcattnError):
    """Slurm is missing, refused something, or answered in a way we cannot read: a runtime
    failure, so the command line exits with status 1 (bad input is status 2)."""

    exit_status = 1
