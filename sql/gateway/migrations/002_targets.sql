-- gateway 002: long and short, target-position orders, the kill switch and
-- reconciliation runs.
--
-- Orders become target net positions: each order row records the signed net
-- quantity of its instrument before (start_position) and after (target_position),
-- in units (lots x lot size, negative for short), where it traded (symbol), and
-- the lots its signal opens or closes on its side (the ledger's change on a fill).
-- quantity stays |target - start|, action the side of that difference.
--
-- New states: a signal 'awaiting_approval' (OpenAlgo's semi-auto mode queued the
-- order for a human); an order 'matched' (the broker was at the target already:
-- nothing placed) or 'awaiting_approval'.

alter table gateway.signals
    add column if not exists side text not null default 'long' check (side in ('long', 'short'));
alter table gateway.signals drop constraint if exists signals_status_check;
alter table gateway.signals add constraint signals_status_check check (status in
    ('pending', 'executing', 'executed', 'failed', 'rejected', 'expired', 'in_doubt',
     'awaiting_approval'));
-- The claim's order within an instrument: by signal time, then type (see claim_signals).
create index if not exists signals_instrument_pending_idx
    on gateway.signals (instrument, signal_at) where status = 'pending';
create index if not exists signals_instrument_executing_idx
    on gateway.signals (instrument) where status = 'executing';

alter table gateway.orders
    add column if not exists side text check (side in ('long', 'short')),
    add column if not exists lots integer check (lots >= 0),
    add column if not exists start_position bigint,
    add column if not exists target_position bigint,
    add column if not exists symbol text;
alter table gateway.orders drop constraint if exists orders_outcome_check;
alter table gateway.orders add constraint orders_outcome_check check (outcome in
    ('sending', 'filled', 'matched', 'rejected', 'awaiting_approval', 'not_sent', 'unknown'));

alter table gateway.positions
    add column if not exists side text not null default 'long' check (side in ('long', 'short'));
create index if not exists positions_open_side_idx
    on gateway.positions (instrument, side, entry_at) where status = 'open';

-- The paper broker keeps the target each request asked for (null: a request of
-- 0.1, which was a delta).
alter table gateway.paper_broker_requests add column if not exists target bigint;

-- The kill switch: one row. 'halted' sends nothing; 'entries_only' lets exits out.
create table if not exists gateway.trading_halt (
    id         boolean primary key default true check (id),
    mode       text not null default 'running' check (mode in ('running', 'halted', 'entries_only')),
    reason     text,
    changed_by text,
    changed_at timestamptz not null default now()
);
insert into gateway.trading_halt (id) values (true) on conflict do nothing;

-- Position reconciliation runs: the ledger's open net position per instrument
-- against the broker's. A row with a null outcome is a request not yet run.
create table if not exists gateway.reconciliations (
    id           bigint generated always as identity primary key,
    requested_by text not null,
    trigger      text not null check (trigger in ('elected', 'schedule', 'admin', 'cli')),
    requested_at timestamptz not null default now(),
    epoch        bigint,
    instance_id  text,
    finished_at  timestamptz,
    outcome      text check (outcome in ('matched', 'mismatch', 'failed')),
    items        jsonb not null default '[]',
    detail       text
);
create index if not exists reconciliations_requested_idx
    on gateway.reconciliations (requested_at) where outcome is null;

-- Each instance's fingerprint of its trading settings (instruments file, max age,
-- allow-list, halt action, broker): followers decide what they accept, the leader
-- what it executes, so they must agree.
create table if not exists gateway.instance_settings (
    election    text not null,
    instance_id text not null,
    fingerprint text not null,
    updated_at  timestamptz not null default now(),
    primary key (election, instance_id)
);
