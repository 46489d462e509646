"""Retarget service: post-sale campaigns with coupons, exactly-once ledger, funnel and ROI.

Layout: ``config`` (settings), ``db`` (pool + dialect), ``migrations`` (schema), ``repository``
(the ledger), ``domain`` (money math, arm assignment, names), ``validation`` (requests), ``audience``
(client of the audience service), ``launcher`` (resumable launches), ``report`` (funnel + stats),
``convert`` (rows to protos), ``servicer`` and ``server`` (gRPC).
"""
