"""Event kinds of in-air development that the log did not know yet.

The operator's secure room and the data owner both record them, and the log accepts
only registered kinds: both services import this module.
"""

from governance.ledger.events import register_event_kind

PACKAGE_RUN = register_event_kind("package_run")
PACKAGE_RUN_REFUSED = register_event_kind("package_run_refused")
PRODUCT_PUBLISHED = register_event_kind("product_published")
