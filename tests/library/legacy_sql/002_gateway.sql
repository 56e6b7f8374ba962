-- pgleader 002: the signal gateway's inbox, orders, the paper broker's own
-- record, the positions ledger and alerts. Idempotent.
--
-- Life of a signal:  pending -> executing -> executed | failed
--                    pending -> expired            (too old when the leader got to it)
--                    executing -> in_doubt          (the broker cannot tell what happened)
--                    executing -> pending           (reconciled: the order never reached the broker)
-- 'rejected' is for signals refused after they were stored (kept for operators).

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

create or replace function gateway.raise_alert(
    p_kind text, p_signal_id bigint, p_instance text, p_detail text
) returns bigint language plpgsql as $$
declare
    id bigint;
begin
    insert into gateway.alerts (kind, signal_id, instance_id, detail)
    values (p_kind, p_signal_id, p_instance, left(p_detail, 2000))
    returning alerts.id into id;
    perform pg_notify('pgleader_events', json_build_object(
        'event', 'alert', 'kind', p_kind, 'signal_id', p_signal_id,
        'instance', p_instance, 'detail', left(p_detail, 500), 'at', clock_timestamp())::text);
    return id;
end
$$;

-- What an operator asks first: how many signals in which state, and the oldest waiting.
create or replace view gateway.signal_summary as
select status, count(*) as signals, min(received_at) as oldest_received, max(received_at) as newest_received
  from gateway.signals group by status;

-- The claim, run by the leader inside the transaction that passed the epoch
-- fence (pgleader.check_epoch). Moves one pending signal to 'executing' stamped
-- with the epoch and books the order it will send, or ends it as 'expired' /
-- 'rejected' with an alert. Returns nothing when the signal was not pending.
create or replace function gateway.claim_signal(
    p_signal_id bigint, p_epoch bigint, p_instance text, p_broker text, p_max_age interval,
    out status text, out client_order_id text, out instrument text, out action text,
    out quantity bigint, out price numeric
) returns setof record language plpgsql as $$
declare
    s gateway.signals;
    open_lots bigint;
begin
    select * into s from gateway.signals where id = p_signal_id and signals.status = 'pending'
       for update skip locked;
    if not found then
        return;
    end if;
    instrument := s.instrument;
    price := s.price;
    action := case when s.type = 'EXIT' then 'SELL' else 'BUY' end;
    quantity := s.lots;
    if s.signal_at < now() - p_max_age then
        status := 'expired';
        update gateway.signals set status = 'expired', claimed_epoch = p_epoch, claimed_by = p_instance,
               claimed_at = now(), finished_at = now(), updated_at = now(),
               detail = format('signal time %s is older than the max age %s', s.signal_at, p_max_age)
         where id = p_signal_id;
        perform gateway.raise_alert('signal_expired', p_signal_id, p_instance,
            format('%s %s %s expired unexecuted', s.type, s.instrument, s.position));
        return next;
        return;
    end if;
    if s.type = 'EXIT' and s.lots = 0 then
        select coalesce(sum(p.lots), 0) into open_lots
          from gateway.positions p where p.instrument = s.instrument and p.status = 'open';
        quantity := open_lots;
    end if;
    if quantity <= 0 then
        status := 'rejected';
        update gateway.signals set status = 'rejected', claimed_epoch = p_epoch, claimed_by = p_instance,
               claimed_at = now(), finished_at = now(), updated_at = now(),
               detail = 'exit with no open position to close'
         where id = p_signal_id;
        perform gateway.raise_alert('signal_rejected', p_signal_id, p_instance,
            format('EXIT %s %s: no open position', s.instrument, s.position));
        return next;
        return;
    end if;
    status := 'executing';
    client_order_id := format('pgl-%s-e%s-%s', p_signal_id, p_epoch,
        (select count(*) + 1 from gateway.orders o where o.signal_id = p_signal_id));
    update gateway.signals set status = 'executing', claimed_epoch = p_epoch, claimed_by = p_instance,
           claimed_at = now(), updated_at = now(), detail = null
     where id = p_signal_id;
    insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id, action, quantity)
    values (p_signal_id, p_epoch, p_instance, p_broker, client_order_id, action, quantity);
    return next;
end
$$;

-- Record what the broker said about an order and finish its signal; books the
-- position on a fill. Idempotent: a signal no longer 'executing' is left alone.
create or replace function gateway.complete_order(
    p_client_order_id text, p_outcome text, p_broker_order_id text, p_detail text
) returns text language plpgsql as $$
declare
    o gateway.orders;
    s gateway.signals;
    base_id bigint;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    select * into s from gateway.signals where id = o.signal_id for update;
    if s.status <> 'executing' then
        return s.status;
    end if;
    update gateway.orders set outcome = p_outcome, broker_order_id = p_broker_order_id,
           detail = p_detail, updated_at = now()
     where id = o.id;
    update gateway.signals
       set status = case when p_outcome = 'filled' then 'executed' else 'failed' end,
           finished_at = now(), updated_at = now(), detail = p_detail
     where id = s.id;
    if p_outcome <> 'filled' then
        perform gateway.raise_alert('order_rejected', s.id, o.instance_id,
            format('%s %s rejected by %s: %s', o.action, s.instrument, o.broker, p_detail));
        return 'failed';
    end if;
    if s.type = 'EXIT' then
        update gateway.positions set status = 'closed', exit_signal_id = s.id, exit_at = now()
         where instrument = s.instrument and status = 'open';
    else
        if s.type = 'PYRAMID' then
            select p.id into base_id from gateway.positions p
             where p.instrument = s.instrument and p.status = 'open' and p.is_base_position
             order by p.entry_at desc limit 1;
        end if;
        insert into gateway.positions
            (instrument, position, signal_id, is_base_position, base_position_id, lots, entry_price, stop)
        values (s.instrument, s.position, s.id, s.type = 'BASE_ENTRY', base_id, o.quantity, s.price, s.stop);
    end if;
    return 'executed';
end
$$;

-- Reconciliation found that an order never reached the broker: mark it and put
-- the signal back in the queue. Run inside a fenced transaction by the leader.
create or replace function gateway.requeue_signal(p_client_order_id text) returns boolean
language plpgsql as $$
declare
    o gateway.orders;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    update gateway.orders set outcome = 'not_sent', detail = 'broker never received it',
           updated_at = now()
     where id = o.id and outcome in ('sending', 'unknown');
    update gateway.signals set status = 'pending', claimed_epoch = null, claimed_by = null,
           claimed_at = null, updated_at = now(), detail = 'requeued after reconciliation'
     where id = o.signal_id and status = 'executing';
    return found;
end
$$;

-- The broker cannot tell what happened: stop, and page a human.
create or replace function gateway.mark_in_doubt(p_client_order_id text, p_detail text)
returns boolean language plpgsql as $$
declare
    o gateway.orders;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    update gateway.orders set outcome = 'unknown', detail = p_detail, updated_at = now() where id = o.id;
    update gateway.signals set status = 'in_doubt', finished_at = now(), updated_at = now(),
           detail = p_detail
     where id = o.signal_id and status = 'executing';
    if found then
        perform gateway.raise_alert('signal_in_doubt', o.signal_id, o.instance_id, p_detail);
    end if;
    return found;
end
$$;

-- Signals left 'executing', with the order each was sent as: reconciliation's work list.
create or replace view gateway.executing as
select s.id as signal_id, s.claimed_epoch, s.claimed_by, s.claimed_at, o.client_order_id, o.outcome
  from gateway.signals s
  join lateral (select * from gateway.orders o where o.signal_id = s.id order by o.id desc limit 1) o on true
 where s.status = 'executing';
