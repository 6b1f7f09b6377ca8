"""HDF5 results: one master file per job run, always consistent, plus per-case activation files.

Layout (details in docs/hdf5-layout.md)::

    results/quickstart.h5            master: provenance, every completed case, virtual datasets
    results/quickstart.h5.d/         activation files, one directory per case
        case_0003/r0.h5 ...          serial h5py: one shard file per rank (its positions, local order)
        case_0003/all.h5             h5py with MPI: one file in global order, written collectively

One concept per module: :mod:`.format` (what a results file is, opening it, crash-safe
replacing), :mod:`.tree` (results dicts <-> groups), :mod:`.provenance`, :mod:`.activations`
(shards and virtual datasets), :mod:`.master` (the master file and its lock), :mod:`.merge`,
:mod:`.files` (writing without following links, unique temporaries, checksums, a full disk),
:mod:`.verify` (``verify(path)``: completed cases whose activation files are missing or changed).
"""
from .activations import ACTIVATIONS, SEQ_AXIS, add_virtual, write_activations
from .format import (FORMAT, FORMAT_VERSION, TIMING_KEYS, ResultsError, case_name, have_mpio, now,
                     params_json, sidecar)
from .reading import completed, open_results
from .master import Master, verify
from .merge import merge
from .provenance import SLURM_VARS, provenance
from .tree import read_tree, write_tree
from .verify import missing_sources

__all__ = ["ACTIVATIONS", "FORMAT", "FORMAT_VERSION", "SEQ_AXIS", "SLURM_VARS", "TIMING_KEYS",
           "Master", "ResultsError", "add_virtual", "case_name", "completed", "have_mpio", "merge",
           "missing_sources", "now", "open_results", "params_json", "provenance", "read_tree",
           "sidecar", "verify", "write_activations", "write_tree"]
