-- gateway 004: what the leader's jobs need: futures rollovers, retention that
-- keeps the trading record, and the statistics row.
--
-- Retention deletes old terminal signals; orders, positions, alerts and
-- reconciliations are the trading record and outlive them. So their references to
-- a signal become `on delete set null`, and an order carries what an audit needs
-- without its signal (its instrument; side, lots, symbol and times it had).
--
-- A futures instrument with contract rules trades one contract at a time: an
-- open position records the contract it is in (exchange:symbol:product), and a
-- rollover moves it to the next contract through a persistent state machine
-- (gateway.rollovers): due -> exiting -> entering -> rolled. While a roll of an
-- instrument is active no signal of it is claimed.

alter table gateway.orders add column if not exists instrument text;
update gateway.orders o set instrument = s.instrument
  from gateway.signals s where s.id = o.signal_id and o.instrument is null;
alter table gateway.orders alter column signal_id drop not null;
alter table gateway.orders drop constraint if exists orders_signal_id_fkey;
alter table gateway.orders add constraint orders_signal_id_fkey
    foreign key (signal_id) references gateway.signals (id) on delete set null;
create index if not exists orders_instrument_idx on gateway.orders (instrument, created_at);

alter table gateway.positions drop constraint if exists positions_signal_id_fkey;
alter table gateway.positions add constraint positions_signal_id_fkey
    foreign key (signal_id) references gateway.signals (id) on delete set null;
alter table gateway.positions drop constraint if exists positions_exit_signal_id_fkey;
alter table gateway.positions add constraint positions_exit_signal_id_fkey
    foreign key (exit_signal_id) references gateway.signals (id) on delete set null;
alter table gateway.alerts drop constraint if exists alerts_signal_id_fkey;
alter table gateway.alerts add constraint alerts_signal_id_fkey
    foreign key (signal_id) references gateway.signals (id) on delete set null;
-- Retention finds old terminal signals by their end, and the references to them.
create index if not exists signals_finished_idx on gateway.signals (finished_at)
    where status in ('executed', 'failed', 'rejected', 'expired');
create index if not exists positions_signal_idx on gateway.positions (signal_id);
create index if not exists positions_exit_signal_idx on gateway.positions (exit_signal_id);
create index if not exists alerts_signal_idx on gateway.alerts (signal_id);

-- The contract an open position is in (null: the instrument's fixed symbol).
alter table gateway.positions add column if not exists contract text;

create table if not exists gateway.rollovers (
    id            bigint generated always as identity primary key,
    instrument    text not null,
    from_contract text not null,
    from_expiry   date not null,
    to_contract   text not null,
    to_expiry     date not null,
    side          text not null check (side in ('long', 'short')),
    lots          bigint not null check (lots > 0),
    units         bigint not null check (units > 0),
    state         text not null default 'due'
                  check (state in ('due', 'exiting', 'entering', 'rolled')),
    epoch         bigint not null,
    instance_id   text not null,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    finished_at   timestamptz,
    detail        text
);
-- At most one active roll per instrument.
create unique index if not exists rollovers_active_idx on gateway.rollovers (instrument)
    where state in ('due', 'exiting', 'entering');
alter table gateway.orders add column if not exists rollover_id bigint
    references gateway.rollovers (id);

-- The leader's statistics (refreshed by its `statistics` job): one row.
create table if not exists gateway.portfolio_state (
    id           boolean primary key default true check (id),
    statistics   jsonb not null default '{}',
    refreshed_at timestamptz,
    epoch        bigint,
    instance_id  text
);
insert into gateway.portfolio_state (id) values (true) on conflict do nothing;

-- claim_signals returns where each order trades (its contract): a new column.
drop function if exists gateway.claim_signals(
    text, bigint, bigint[], text, text, interval, jsonb, interval, text);
drop function if exists gateway.claim_instrument(
    text, bigint, text, text, interval, jsonb, interval, text, text);
