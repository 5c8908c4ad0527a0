"""The reference application: the composition root, and its worker.

`APP` is what `stead dev`, `stead worker` and `stead api` load (`--app worker:APP`, as the
Makefile passes it): the support desk's pipelines, its records and facts, its policy files,
its tables and its own HTTP routes. `python worker.py` runs a worker for it, like
`stead worker --app worker:APP`.
"""

from __future__ import annotations

from pathlib import Path

import stead
from activities import support_desk
from api import intake
from workflows.doc_qa import DocQaWorkflow
from workflows.summarize import SummarizeWorkflow
from workflows.support_agent import SupportAgentWorkflow
from workflows.triage import TriageWorkflow

HERE = Path(__file__).parent

APP = stead.App(
    "support-desk",
    pipelines=[SummarizeWorkflow, TriageWorkflow, SupportAgentWorkflow, DocQaWorkflow],
    records={"customer": support_desk.load_customer},
    facts=support_desk.customer_facts,
    policies=HERE / "policies",
    migrations=support_desk.MIGRATIONS,
    seed=support_desk.seed,
    routers=[intake.router],
    demo=intake.demo,
)

if __name__ == "__main__":
    from stead.worker import main

    main(APP)
