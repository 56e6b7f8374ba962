-- gateway: the current definition of every function and view of the signal gateway.
--
-- Repeatable, like sql/pgleader/functions.sql (whose header says how it is applied):
-- a function is changed here, in place, never in a migration.
--
-- Privileges. The instances' role (sql/roles.sql) reads these tables, inserts
-- into gateway.signals (the webhook) and gateway.paper_broker_requests (the paper
-- broker, standing for the outside world), and changes nothing else but through
-- the functions marked SECURITY DEFINER below: they run with the rights of their
-- owner (the role that ran the migrations), with a fixed search_path, callable
-- only by the roles they are granted to (never PUBLIC). The claim is fenced by
-- itself (pgleader.check_epoch); a requeue runs in the caller's fenced transaction;
-- recording what the broker said (complete_orders, mark_in_doubt) records a fact,
-- whatever the epoch. The others run with their caller's rights: the role cannot
-- use them to write.


-- The rules of an order, each written once ---------------------------------------

-- The side a signal trades: an exit sells, everything else buys.
create or replace function gateway.order_action(p_type text) returns text
language sql immutable parallel safe as $$
    select case when p_type = 'EXIT' then 'SELL' else 'BUY' end
$$;

-- The client order id of a signal's next order under an epoch,
-- pgl-<signal id>-e<epoch>-<attempt>: the attempt counts the orders the signal had,
-- so a requeued signal's new order never reuses an id the broker has seen.
create or replace function gateway.next_client_order_id(p_signal_id bigint, p_epoch bigint)
returns text language sql stable as $$
    select format('pgl-%s-e%s-%s', p_signal_id, p_epoch,
                  (select count(*) + 1 from gateway.orders o where o.signal_id = p_signal_id))
$$;


-- Alerts ------------------------------------------------------------------------

-- Record an alert and broadcast it on pgleader_events for whoever pages.
create or replace function gateway.raise_alert(
    p_kind text, p_signal_id bigint, p_instance text, p_detail text
) returns bigint language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
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
revoke execute on function gateway.raise_alert(text, bigint, text, text) from public;


-- Claiming signals for execution ----------------------------------------------------

-- The claim of one signal, run inside a transaction that passed the epoch fence
-- (pgleader.check_epoch). Moves one pending signal to 'executing' stamped with
-- the epoch and books the order it will send, or ends it as 'expired' / 'rejected'
-- with an alert. Returns nothing when the signal was not pending. The rule of
-- every claim; claim_signals runs it for the signals that need more than the
-- common case.
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
    action := gateway.order_action(s.type);
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
    client_order_id := gateway.next_client_order_id(p_signal_id, p_epoch);
    update gateway.signals set status = 'executing', claimed_epoch = p_epoch, claimed_by = p_instance,
           claimed_at = now(), updated_at = now(), detail = null
     where id = p_signal_id;
    insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id, action, quantity)
    values (p_signal_id, p_epoch, p_instance, p_broker, client_order_id, action, quantity);
    return next;
end
$$;

-- The executor's claim of a batch: the given signals, under epoch p_epoch of
-- p_election. Fenced first (pgleader.check_epoch raises PGL01 for a stale epoch,
-- and nothing is claimed). One row per id, in the order given. `acted` says this
-- call moved the signal: to 'executing' (client_order_id names the order to send
-- now), or ended it 'expired'/'rejected'. Otherwise status is the signal's own,
-- not ours to act on ('pending' when another transaction holds it; null for an
-- unknown id).
--
-- The common case goes through one statement together: a pending signal, younger
-- than the max age, with lots of its own (entries; exits that name their lots).
-- Expired signals, exits of every open lot and rejections go through
-- gateway.claim_signal, one by one. Same results either way; only the ids of
-- positions opened by one batch may be numbered in another order.
create or replace function gateway.claim_signals(
    p_election text, p_epoch bigint, p_ids bigint[], p_instance text, p_broker text,
    p_max_age interval
) returns table (
    signal_id bigint, acted boolean, status text, client_order_id text, instrument text,
    action text, quantity bigint, price numeric
) language plpgsql security definer
-- Plans made once per session (a custom plan of these statements at every call
-- costs more than the work), and on the indexes whatever the statistics say: a plan
-- made while a table was nearly empty would otherwise scan it whole for good.
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan set enable_seqscan = off as $$
declare
    fast bigint[];
    coids text[];
    actions text[];
    quantities bigint[];
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    fast := '{}';
    if cardinality(p_ids) >= 3 then  -- for one or two, per row is cheaper (measured)
        with picked as (
            select s.id from gateway.signals s
             where s.id = any(p_ids) and s.status = 'pending' and s.lots > 0
               and s.signal_at >= now() - p_max_age
             order by s.id
               for update skip locked
        ), claimed as (
            update gateway.signals s
               set status = 'executing', claimed_epoch = p_epoch, claimed_by = p_instance,
                   claimed_at = now(), updated_at = now(), detail = null
              from picked
             where s.id = picked.id
            returning s.id, s.type, s.lots
        ), booked as (
            insert into gateway.orders
                (signal_id, epoch, instance_id, broker, client_order_id, action, quantity)
            select c.id, p_epoch, p_instance, p_broker,
                   gateway.next_client_order_id(c.id, p_epoch), gateway.order_action(c.type),
                   c.lots
              from claimed c
             order by c.id
            returning orders.signal_id, orders.client_order_id, orders.action, orders.quantity
        )
        select coalesce(array_agg(b.signal_id), '{}'), array_agg(b.client_order_id),
               array_agg(b.action), array_agg(b.quantity)
          into fast, coids, actions, quantities
          from booked b;
    end if;

    return query
    select x.id, x.acted, x.status, x.client_order_id, x.instrument, x.action, x.quantity,
           x.price
      from (
        select t.n, t.id, true as acted, 'executing'::text as status,
               b.coid as client_order_id, s.instrument, b.action, b.quantity, s.price
          from unnest(p_ids) with ordinality as t (id, n)
          join unnest(fast, coids, actions, quantities) as b (id, coid, action, quantity)
            on b.id = t.id
          join gateway.signals s on s.id = t.id
        union all
        select t.n, t.id, c.status is not null, coalesce(c.status, s.status), c.client_order_id,
               c.instrument, c.action, c.quantity, c.price
          from unnest(p_ids) with ordinality as t (id, n)
          left join lateral (
              select * from gateway.claim_signal(t.id, p_epoch, p_instance, p_broker, p_max_age)
               where not t.id = any(fast)
          ) c on true
          left join gateway.signals s on s.id = t.id
         where not t.id = any(fast)
      ) x
     order by x.n;
end
$$;
revoke execute on function gateway.claim_signals(text, bigint, bigint[], text, text, interval)
    from public;


-- Recording what the broker said ------------------------------------------------

-- Record what the broker said about one order and finish its signal; books the
-- position on a fill. Idempotent: a signal no longer 'executing' is left alone.
-- Null for an unknown client order id (the executor records only orders it
-- booked; an operator in psql may pass any id).
create or replace function gateway.complete_order(
    p_client_order_id text, p_outcome text, p_broker_order_id text, p_detail text
) returns text language plpgsql as $$
declare
    o gateway.orders;
    s gateway.signals;
    base_id bigint;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    if not found then
        return null;
    end if;
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

-- The executor's record of a batch: the broker's answers for many orders at once,
-- in the order given; returns each order's signal status afterwards. A filled
-- order of a BASE_ENTRY whose instrument has no other kind of signal in the batch
-- is recorded set-based, in one statement (exits close and pyramids look up open
-- positions, so their instrument keeps the per-row order); the rest goes through
-- gateway.complete_order, one by one.
create or replace function gateway.complete_orders(
    p_client_order_ids text[], p_outcomes text[], p_broker_order_ids text[], p_details text[]
) returns table (client_order_id text, status text) language plpgsql security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan set enable_seqscan = off as $$
declare
    fast text[];
begin
    fast := '{}';
    if cardinality(p_client_order_ids) >= 3 then  -- for one or two, per row is cheaper
        with input as (
            select * from unnest(p_client_order_ids, p_outcomes, p_broker_order_ids, p_details)
                   with ordinality as t (coid, outcome, broker_order_id, detail, n)
        ), mine as (
            select i.coid, i.outcome, i.broker_order_id, i.detail, i.n, o.id as order_id,
                   o.signal_id, o.quantity, s.type, s.instrument, s.position, s.price, s.stop
              from input i
              join gateway.orders o on o.client_order_id = i.coid
              join gateway.signals s on s.id = o.signal_id
        ), picked as (
            select m.* from mine m
             where m.outcome = 'filled' and m.type = 'BASE_ENTRY'
               and not exists (select from mine x
                                where x.instrument = m.instrument and x.type <> 'BASE_ENTRY')
        ), finished as (
            update gateway.signals s
               set status = 'executed', finished_at = now(), updated_at = now(), detail = p.detail
              from picked p
             where s.id = p.signal_id and s.status = 'executing'
            returning s.id
        ), answered as (
            update gateway.orders o
               set outcome = 'filled', broker_order_id = p.broker_order_id, detail = p.detail,
                   updated_at = now()
              from picked p join finished f on f.id = p.signal_id
             where o.id = p.order_id
            returning o.client_order_id
        ), opened as (
            insert into gateway.positions
                (instrument, position, signal_id, is_base_position, base_position_id, lots,
                 entry_price, stop)
            select p.instrument, p.position, p.signal_id, true, null, p.quantity, p.price, p.stop
              from picked p join finished f on f.id = p.signal_id
             order by p.n
            returning positions.id
        )
        select coalesce(array_agg(a.client_order_id), '{}') into fast from answered a;
    end if;

    return query
    select t.coid,
           case when t.coid = any(fast) then 'executed'
                else gateway.complete_order(t.coid, t.outcome, t.broker_order_id, t.detail) end
      from unnest(p_client_order_ids, p_outcomes, p_broker_order_ids, p_details)
           with ordinality as t (coid, outcome, broker_order_id, detail, n)
     order by t.n;
end
$$;
revoke execute on function gateway.complete_orders(text[], text[], text[], text[]) from public;


-- Reconciliation --------------------------------------------------------------------

-- An order never reached the broker: mark it and put the signal back in the
-- queue. Run inside a fenced transaction by the leader.
create or replace function gateway.requeue_signal(p_client_order_id text) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
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
revoke execute on function gateway.requeue_signal(text) from public;

-- The broker cannot tell what happened: stop, and page a human.
create or replace function gateway.mark_in_doubt(p_client_order_id text, p_detail text)
returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
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
revoke execute on function gateway.mark_in_doubt(text, text) from public;


-- What an operator reads ------------------------------------------------------------

-- How many signals in which state, and the oldest waiting: what an operator asks first.
create or replace view gateway.signal_summary as
select status, count(*) as signals, min(received_at) as oldest_received, max(received_at) as newest_received
  from gateway.signals group by status;

-- Signals left 'executing', with the order each was sent as: reconciliation's work list.
create or replace view gateway.executing as
select s.id as signal_id, s.claimed_epoch, s.claimed_by, s.claimed_at, o.client_order_id, o.outcome
  from gateway.signals s
  join lateral (select * from gateway.orders o where o.signal_id = s.id order by o.id desc limit 1) o on true
 where s.status = 'executing';
