-- gateway 008: an entry is refused when an exit of its side, signalled in a later
-- second, was already acted on (claim_instrument): it arrived out of order (spooled on
-- an instance whose database was away while the exit reached another) and would open
-- a position that exit meant to close. Every entry's claim asks; this index answers
-- from the exits of one instrument and side, never the history of entries.
create index if not exists signals_exits_idx on gateway.signals (instrument, side, signal_at)
    where type = 'EXIT';
