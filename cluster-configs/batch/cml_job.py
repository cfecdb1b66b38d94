"""A CML Job that runs a Ray batch job on a cluster made for it, gone when the job ends.

In CML: Jobs > New Job, with
    Script:     cluster-configs/batch/cml_job.py
    Arguments:  --cluster cluster-configs/cml-cluster.yaml --model .ray-cml/models/MODEL
                --prompts data/prompts.jsonl --out data/answers.jsonl
    Runtime:    a Python 3.10+ runtime; ray-cml-provider installed in the project once
                (from a session: pip install --user ray-cml-provider)
    Schedule:   manual, a cron expression, or after another job. No session needs to be open.

The job runs ``ray-cml job submit CLUSTER --down --working-dir cluster-configs/batch --
python batch_llm.py ...``: it brings the Ray cluster up (its head and then, on demand, its
GPU workers are CML applications of this project), submits the batch, prints the batch's
log into this job's log as it comes, and ends with the batch's outcome, so CML shows the
run as succeeded or failed. The head deletes the cluster once the batch ended, whatever
becomes of this job's engine (stopped, timed out). CML gives a job's engine the project's
``CDSW_*`` variables and an API key: ``ray-cml`` needs nothing else.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CLUSTER = "cluster-configs/cml-cluster.yaml"


def main() -> None:
    # CML passes the job's arguments on the command line and in JOB_ARGUMENTS.
    arguments = sys.argv[1:] or shlex.split(os.environ.get("JOB_ARGUMENTS", ""))
    cluster = DEFAULT_CLUSTER
    if "--cluster" in arguments:
        at = arguments.index("--cluster")
        cluster = arguments[at + 1]
        del arguments[at : at + 2]
    command = [
        "ray-cml", "job", "submit", cluster, "--down", "--working-dir", str(HERE),
        "--", "python", "batch_llm.py", *arguments,
    ]  # fmt: skip
    print("cml job:", shlex.join(command), flush=True)
    os.execvp(command[0], command)  # its exit status is the job's: 0 when the batch succeeded


if __name__ == "__main__":
    main()
