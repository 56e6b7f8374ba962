"""The gateway's periodic jobs, run by pgleader's job runner on the leader only:
`reconcile`, `rollover`, `retention`, `statistics`, `prune-instances`."""
