"""Errors a user can cause. Messages are one line and name the value and the expectation."""


class HpcattnError(ValueError):
    """Bad input or configuration detected by hpcattn."""


class CollectiveError(HpcattnError):
    """An input error that every rank detected together (raised identically on all ranks),
    so the job can stop cleanly without MPI_Abort."""


class UsageError(HpcattnError):
    """A command used in a way that cannot work (options that clash with how it was started);
    the command line reports it with the command's usage, exit status 2."""
