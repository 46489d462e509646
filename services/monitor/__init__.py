"""The sale monitor deployable: live sale counters from the event stream (``counters``), the
SaleMonitorService (``servicer``), the STOP / BOOST / COPY campaign rules (``rules``) and the process
(``server``, ``__main__``). It shares no code with the retarget ledger; it calls retarget over gRPC.
"""
