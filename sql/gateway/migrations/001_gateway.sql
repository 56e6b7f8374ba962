-- gateway 001: the signal gateway's inbox, orders, the paper broker's own
-- record, the positions ledger and alerts.
--
-- Life of a signal:  pending -> executing -> executed | failed
--                    pending -> expired            (too old when the leader got to it)
--                    executing -> in_doubt          (the broker cannot tell what happened)
--                    executing -> pending           (reconciled: the order never reached the broker)
-- 'rejected' is for signals refused after they were stored (kept for operators).
--
-- The tables only; the functions that move a signal and its order through these
-- states, and the views, are in ../functions.sql. Idempotent: a database of the
-- 0.1 layout (sql/001-006, before the streams) has these tables already, exactly
-- so, and this file leaves them as they are.

create schema if not exists gateway;

create table if not exists gateway.signals (
    id            bigint generated always as identity primary key,
    fingerprint   text not null unique,
    type          text not null check (type in ('BASE_ENTRY', 'PYRAMID', 'EXIT')),
    instrument    text not null,
    position      text not null,
    lots          integer not null check (lots >= 0),
    price         numeric,
    stop          numeric,
    signal_at     timestamptz not null,
    payload       jsonb not null,
    received_by   text not null,
    received_at   timestamptz not null default now(),
    status        text not null default 'pending' check (status in
                  ('pending', 'executing', 'executed', 'failed', 'rejected', 'expired', 'in_doubt')),
    claimed_epoch bigint,
    claimed_by    text,
    claimed_at    timestamptz,
    finished_at   timestamptz,
    detail        text,
    updated_at    timestamptz not null default now(),
    check (status = 'pending' or status = 'expired' or claimed_epoch is not null
           or status = 'rejected')
);
create index if not exists signals_pending_idx on gateway.signals (received_at) where status = 'pending';
create index if not exists signals_executing_idx on gateway.signals (claimed_at) where status = 'executing';
create index if not exists signals_received_idx on gateway.signals (received_at);

-- One row per order the broker was asked to place, written in the claim
-- transaction *before* the call, so a successor can always ask the broker about it.
create table if not exists gateway.orders (
    id              bigint generated always as identity primary key,
    signal_id       bigint not null references gateway.signals (id),
    epoch           bigint not null,
    instance_id     text not null,
    broker          text not null,
    client_order_id text not null unique,
    action          text not null check (action in ('BUY', 'SELL')),
    quantity        bigint not null,
    broker_order_id text,
    outcome         text not null default 'sending' check (outcome in
                    ('sending', 'filled', 'rejected', 'not_sent', 'unknown')),
    detail          text,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    -- the claim's transaction, for audits of "which epoch was current when it committed"
    claim_txid      bigint not null default txid_current()
);
create index if not exists orders_signal_idx on gateway.orders (signal_id);

-- The paper broker's own book: every order request it received. No uniqueness
-- on purpose: it stands for the outside world, where a duplicate must show.
create table if not exists gateway.paper_broker_requests (
    id              bigint generated always as identity primary key,
    client_order_id text not null,
    instrument      text not null,
    action          text not null,
    quantity        bigint not null,
    price           numeric,
    epoch           bigint,
    instance_id     text,
    received_at     timestamptz not null default clock_timestamp()
);
create index if not exists paper_broker_requests_coid_idx
    on gateway.paper_broker_requests (client_order_id);

create table if not exists gateway.positions (
    id               bigint generated always as identity primary key,
    instrument       text not null,
    position         text not null,
    signal_id        bigint references gateway.signals (id),
    is_base_position boolean not null,
    base_position_id bigint references gateway.positions (id) on delete set null,
    lots             integer not null,
    entry_price      numeric,
    stop             numeric,
    entry_at         timestamptz not null default now(),
    exit_signal_id   bigint references gateway.signals (id),
    exit_at          timestamptz,
    status           text not null default 'open' check (status in ('open', 'closed')),
    rollover_status  text not null default 'none' check (rollover_status in ('none', 'due', 'rolled')),
    expiry           date
);
create index if not exists positions_instrument_entry_idx on gateway.positions (instrument, entry_at);
create index if not exists positions_rollover_idx on gateway.positions (rollover_status, expiry);
create index if not exists positions_open_idx on gateway.positions (instrument) where status = 'open';

-- Alerts: recorded here and broadcast on pgleader_events for whoever pages.
create table if not exists gateway.alerts (
    id         bigint generated always as identity primary key,
    kind       text not null,
    signal_id  bigint references gateway.signals (id),
    instance_id text,
    detail     text,
    created_at timestamptz not null default now()
);
create index if not exists alerts_created_idx on gateway.alerts (created_at);
