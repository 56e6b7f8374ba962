-- pgleader 005: the common case of a batch in one pass. 004 ran the per-signal
-- functions of 002 once per row (four statements each for a claim, five for a
-- record); here the rows that need nothing but the plain rule go through one
-- statement together, and only the rest take the per-row path. Same results, same
-- order of results (the input order), same fence; only the ids of positions opened
-- by one batch may be numbered in another order. Idempotent.

-- Claim: a pending signal, younger than the max age, with lots of its own (entries;
-- exits that name their lots) is claimed and booked set-based. Expired signals,
-- exits of every open lot and rejections go through gateway.claim_signal, as before.
create or replace function gateway.claim_signals(
    p_election text, p_epoch bigint, p_ids bigint[], p_instance text, p_broker text,
    p_max_age interval
) returns table (
    signal_id bigint, acted boolean, status text, client_order_id text, instrument text,
    action text, quantity bigint, price numeric
) language plpgsql
-- Plans made once per session (a custom plan of these statements at every call
-- costs more than the work), and on the indexes whatever the statistics say: a plan
-- made while a table was nearly empty would otherwise scan it whole for good.
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
                   format('pgl-%s-e%s-%s', c.id, p_epoch,
                          (select count(*) + 1 from gateway.orders o where o.signal_id = c.id)),
                   case when c.type = 'EXIT' then 'SELL' else 'BUY' end, c.lots
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

-- Record: a filled order of a BASE_ENTRY whose instrument has no other kind of
-- signal in the batch (exits close and pyramids look up open positions, so their
-- instrument keeps the per-row order) is recorded set-based; the rest goes through
-- gateway.complete_order, in the order given, as before.
create or replace function gateway.complete_orders(
    p_client_order_ids text[], p_outcomes text[], p_broker_order_ids text[], p_details text[]
) returns table (client_order_id text, status text) language plpgsql
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
