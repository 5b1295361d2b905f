"""How a sweep names its trials' run folders."""

TRIAL_PREFIX = "trial_"


def trial_name(trial) -> str:
    """The run name of a Tune trial: trial_NNNNN from its index in the sweep (the experiment tag Tune keeps when it
    restarts a trial under a new id), so a restored sweep's trial resumes its own run folder."""
    return TRIAL_PREFIX + "%05d" % int(trial.experiment_tag.split("_", 1)[0])
