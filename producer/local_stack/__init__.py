"""The local stack: an embedded Redis, the supervisor and worker groups as processes (`tpq up`, `tpq demo`)."""
