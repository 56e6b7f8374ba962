-- gateway 007: the kill switch's fourth mode, 'rewound': an instance found that the
-- database it reaches after a reconnection lacks what it saw before (a standby
-- promoted without the last commits). Nothing is sent, whatever PGLEADER_HALT_ACTION
-- says, until an operator who reconciled with the broker runs
-- `pgleader resume --after-rewind`; a plain resume or halt leaves it.
alter table gateway.trading_halt drop constraint if exists trading_halt_mode_check;
alter table gateway.trading_halt add constraint trading_halt_mode_check
    check (mode in ('running', 'halted', 'entries_only', 'rewound'));
