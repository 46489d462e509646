"""``audience-worker``: runs the audience's pack builds from the shared queue, serves no API.

Deployed beside the serving replicas (``FLASHCROWD_WORKER_PROCESSES`` children of each audience pod,
or a Deployment of its own) so that builds never share a GIL with CheckMembership. It claims
portable jobs from the control database (``services/audience/operation_store.py``), renews their
leases, and at SIGTERM hands the running ones back to the queue. It serves gRPC health only.
"""
