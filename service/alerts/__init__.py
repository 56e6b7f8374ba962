"""Alert delivery: the leader forwards alerts and leadership transitions to Telegram,
a Slack-compatible webhook or a JSON webhook (`sinks.py`), recorded in the database
so that a failover loses none (`delivery.py`), in messages written by `messages.py`."""
