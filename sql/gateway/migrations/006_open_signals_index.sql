-- gateway 006: /metrics counts the signals not yet ended (pending, executing, in
-- doubt, awaiting approval) every few seconds on every instance; this index holds
-- only those, so the count never reads the history (millions of ended signals).
create index if not exists signals_open_idx on gateway.signals (status)
    where status in ('pending', 'executing', 'in_doubt', 'awaiting_approval');
