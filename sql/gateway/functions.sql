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

-- The side of an order from the net position it starts at and the one it targets.
create or replace function gateway.order_action(p_start bigint, p_target bigint) returns text
language sql immutable parallel safe as $$
    select case when p_target > p_start then 'BUY' else 'SELL' end
$$;
drop function if exists gateway.order_action(text);

-- The order of execution within one instrument: by signal time to the second, and
-- within a second an EXIT before a BASE_ENTRY before a PYRAMID (a reversal's two
-- alerts fire in the same second and may reach different instances in either order).
create or replace function gateway.signal_rank(p_type text) returns integer
language sql immutable parallel safe as $$
    select case p_type when 'EXIT' then 0 when 'BASE_ENTRY' then 1 else 2 end
$$;

-- The client order id of a signal's next order under an epoch,
-- pgl-<signal id>-e<epoch>-<attempt>: the attempt counts the orders the signal had,
-- so a requeued signal's new order never reuses an id the broker has seen. A
-- rollover's orders: pgl-roll<rollover id>-<step>-e<epoch>-<attempt>.
create or replace function gateway.client_order_id(p_of text, p_epoch bigint, p_attempt bigint)
returns text language sql immutable as $$
    select format('pgl-%s-e%s-%s', p_of, p_epoch, p_attempt)
$$;

create or replace function gateway.next_client_order_id(p_signal_id bigint, p_epoch bigint)
returns text language sql stable as $$
    select gateway.client_order_id(p_signal_id::text, p_epoch,
                  (select count(*) + 1 from gateway.orders o where o.signal_id = p_signal_id))
$$;


-- The ledger ----------------------------------------------------------------------

-- An instrument's open position in the ledger: its side (null when flat) and lots.
-- Never both sides at once: an entry against an open other side is refused.
-- plpgsql, not sql: PostgreSQL (up to 17) plans the query of a SQL function it cannot
-- inline again at every call (105-120 us a call here, 15-20 us in plpgsql, which plans
-- it once per session); every claim of an entry or an exit calls it.
create or replace function gateway.open_position(p_instrument text, out side text, out lots bigint)
language plpgsql stable as $$
begin
    select min(p.side), coalesce(sum(p.lots), 0) into side, lots
      from gateway.positions p where p.instrument = p_instrument and p.status = 'open';
end
$$;

-- The ledger's open net position of every instrument, in lots (negative for short).
create or replace view gateway.net_positions as
select instrument, min(side) as side, sum(lots) as lots,
       sum(case side when 'short' then -lots else lots end) as net_lots,
       min(entry_at) as since, count(*) as entries
  from gateway.positions where status = 'open'
 group by instrument;

-- A fill moves the ledger: an entry opens its lots on its side; an exit closes the
-- order's lots of its side, oldest first (TradingView's default FIFO), splitting an
-- entry when it closes part of one.
create or replace function gateway.book_fill(s gateway.signals, o gateway.orders)
returns void language plpgsql as $$
declare
    p gateway.positions;
    remaining bigint := o.lots;
    base_id bigint;
begin
    if s.type <> 'EXIT' then
        if s.type = 'PYRAMID' then
            select x.id into base_id from gateway.positions x
             where x.instrument = s.instrument and x.status = 'open' and x.side = s.side
               and x.is_base_position
             order by x.entry_at desc limit 1;
        end if;
        insert into gateway.positions (instrument, position, side, signal_id, is_base_position,
                                       base_position_id, lots, entry_price, stop, contract)
        values (s.instrument, s.position, s.side, s.id, s.type = 'BASE_ENTRY', base_id, o.lots,
                s.price, s.stop, o.symbol);
        return;
    end if;
    for p in select * from gateway.positions x
              where x.instrument = s.instrument and x.status = 'open' and x.side = s.side
              order by x.entry_at, x.id for update loop
        exit when remaining <= 0;
        if p.lots <= remaining then
            update gateway.positions set status = 'closed', exit_signal_id = s.id, exit_at = now()
             where id = p.id;
            remaining := remaining - p.lots;
        else
            update gateway.positions set lots = p.lots - remaining where id = p.id;
            insert into gateway.positions (instrument, position, side, signal_id, is_base_position,
                                           base_position_id, lots, entry_price, stop, entry_at,
                                           exit_signal_id, exit_at, status, expiry, contract,
                                           rollover_status)
            values (p.instrument, p.position, p.side, p.signal_id, p.is_base_position,
                    p.base_position_id, remaining, p.entry_price, p.stop, p.entry_at, s.id, now(),
                    'closed', p.expiry, p.contract, p.rollover_status);
            remaining := 0;
        end if;
    end loop;
end
$$;


-- Alerts ------------------------------------------------------------------------

-- Record an alert, queue its delivery to every enabled alert sink but `p_except_sink`
-- (service/alerts/), and broadcast it on pgleader_events for whoever pages. The
-- writer behind raise_alert and finish_alert_deliveries, which run it as the owner.
create or replace function gateway.record_alert(
    p_kind text, p_signal_id bigint, p_instance text, p_detail text, p_except_sink text
) returns bigint language plpgsql as $$
declare
    new_id bigint;
begin
    insert into gateway.alerts (kind, signal_id, instance_id, detail)
    values (p_kind, p_signal_id, p_instance, left(p_detail, 2000))
    returning id into new_id;
    insert into gateway.alert_deliveries (sink, alert_id)
    select s.sink, new_id from gateway.alert_sinks s
     where s.enabled and s.sink is distinct from p_except_sink;
    perform pg_notify('pgleader_events', json_build_object(
        'event', 'alert', 'kind', p_kind, 'signal_id', p_signal_id,
        'instance', p_instance, 'detail', left(p_detail, 500), 'at', clock_timestamp())::text);
    return new_id;
end
$$;

-- Record an alert (queued for every alert sink) and broadcast it.
create or replace function gateway.raise_alert(
    p_kind text, p_signal_id bigint, p_instance text, p_detail text
) returns bigint language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    return gateway.record_alert(p_kind, p_signal_id, p_instance, p_detail, null);
end
$$;
revoke execute on function gateway.raise_alert(text, bigint, text, text) from public;

-- End a pending signal without an order ('expired' or 'rejected'), with an alert.
create or replace function gateway.end_signal(
    s gateway.signals, p_status text, p_epoch bigint, p_instance text, p_detail text
) returns void language plpgsql as $$
begin
    update gateway.signals set status = p_status, claimed_epoch = p_epoch, claimed_by = p_instance,
           claimed_at = now(), finished_at = now(), updated_at = now(), detail = p_detail
     where id = s.id;
    perform gateway.raise_alert(case p_status when 'expired' then 'signal_expired'
                                              else 'signal_rejected' end,
        s.id, p_instance, format('%s %s %s %s: %s', s.type, s.side, s.instrument, s.position,
                                 p_detail));
end
$$;


-- Claiming signals for execution ----------------------------------------------------

-- The claim of one instrument, inside a transaction that passed the epoch fence
-- (pgleader.check_epoch) and holds the instrument's lock. At most one order of an
-- instrument is in flight: with a signal of it 'executing', nothing happens. Else
-- its pending signals are taken in execution order (signal_rank): the first that
-- can trade moves to 'executing' with its order booked; those before it that cannot
-- end 'expired' or 'rejected' with an alert (among them an entry older, by its
-- signal's second, than an exit of its side that already closed the side or found
-- it flat: it came out of order, and would reopen what that exit closed). One row
-- per signal looked at:
--   executing   claimed; the order's start and target net positions (units)
--   expired, rejected
--   halted      the kill switch holds it (it stays pending; later exits may pass
--               it under entries_only)
--   deferred    it would be refused, but it arrived less than p_reorder ago: the
--               signal that makes it valid (an exit before a reversal's entry, the
--               entry of a pyramid) may be on its way from another instance. It
--               stays pending and the instrument waits behind it.
-- p_instruments: {instrument: {lot_size, max_lots, contract}} of the leader's
-- instruments file, or null without one (any instrument, lot size 1). `contract`
-- (futures with contract rules only): where a new position opens today
-- (exchange:symbol:product); an open position trades in the contract it is in.
-- While a rollover of the instrument is active, nothing is claimed.
create or replace function gateway.claim_instrument(
    p_instrument text, p_epoch bigint, p_instance text, p_broker text, p_max_age interval,
    p_instruments jsonb, p_reorder interval, p_halt text, p_halt_action text,
    out signal_id bigint, out status text, out client_order_id text, out side text,
    out action text, out start_position bigint, out target_position bigint, out price numeric,
    out contract text
) returns setof record language plpgsql as $$
declare
    s gateway.signals;
    spec jsonb;
    lot_size bigint := 1;
    max_lots bigint;
    open_side text;
    open_lots bigint;
    lots bigint;
    new_lots bigint;
    why text;
    later_exit bigint;
    later_at timestamptz;
begin
    if exists (select from gateway.signals x
                where x.instrument = p_instrument and x.status = 'executing')
       or exists (select from gateway.rollovers r
                   where r.instrument = p_instrument and r.state in ('due', 'exiting', 'entering'))
    then
        return;
    end if;
    if p_instruments is not null then
        spec := p_instruments -> p_instrument;
        lot_size := coalesce((spec ->> 'lot_size')::bigint, 1);
        max_lots := (spec ->> 'max_lots')::bigint;
    end if;
    for s in select * from gateway.signals x
              where x.instrument = p_instrument and x.status = 'pending'
              order by date_trunc('second', x.signal_at), gateway.signal_rank(x.type),
                       x.signal_at, x.id
                for update loop
        signal_id := s.id;
        side := s.side;
        price := s.price;
        client_order_id := null;
        contract := null;
        action := null;
        start_position := null;
        target_position := null;
        if s.signal_at < now() - p_max_age then
            status := 'expired';
            perform gateway.end_signal(s, status, p_epoch, p_instance,
                format('signal time %s is older than the max age %s', s.signal_at, p_max_age));
            return next;
            continue;
        end if;
        if p_instruments is not null and spec is null then
            status := 'rejected';
            perform gateway.end_signal(s, status, p_epoch, p_instance,
                format('instrument %s is not in the leader''s instruments file', s.instrument));
            return next;
            continue;
        end if;
        if p_halt = 'rewound' then  -- never rejected: it waits for the operator
            status := 'halted';
            return next;
            continue;
        end if;
        if p_halt = 'halted' or (p_halt = 'entries_only' and s.type <> 'EXIT') then
            status := case when p_halt_action = 'reject' then 'rejected' else 'halted' end;
            if status = 'rejected' then
                perform gateway.end_signal(s, status, p_epoch, p_instance,
                    format('trading is %s', replace(p_halt, '_', ' ')));
            end if;
            return next;
            continue;
        end if;

        select o.side, o.lots into open_side, open_lots from gateway.open_position(p_instrument) o;
        why := null;
        if s.type = 'EXIT' then
            if open_side is distinct from s.side then
                status := 'rejected';
                perform gateway.end_signal(s, status, p_epoch, p_instance,
                    format('nothing open on the %s side to exit', s.side));
                return next;
                continue;
            end if;
            -- lots 0 (or more than open) closes the side; never through flat
            lots := case when s.lots = 0 or s.lots >= open_lots then open_lots else s.lots end;
            new_lots := open_lots - lots;
        else
            -- An exit that closed the side (all its lots, or its order's target flat), or
            -- found nothing open (the text end_signal got above): a partial exit leaves
            -- the side open, and an entry older than it still belongs to the position.
            select x.id, x.signal_at into later_exit, later_at from gateway.signals x
             where x.instrument = p_instrument and x.type = 'EXIT' and x.side = s.side
               and x.signal_at >= date_trunc('second', s.signal_at) + interval '1 second'
               and ((x.status = 'executed'
                     and (x.lots = 0 or exists (select from gateway.orders xo
                                                 where xo.signal_id = x.id
                                                   and xo.target_position = 0)))
                    or (x.status = 'rejected' and x.detail like 'nothing open on the % side to exit'))
             order by x.signal_at limit 1;
            if found then
                status := 'rejected';
                perform gateway.end_signal(s, status, p_epoch, p_instance, format(
                    'signal %s, an exit of the %s side at %s, came after this entry and was'
                    ' acted on first: this entry arrived late and would open a position that'
                    ' exit meant to close', later_exit, s.side, later_at));
                return next;
                continue;
            end if;
            if s.type = 'BASE_ENTRY' and open_side is not null and open_side <> s.side then
                why := format('a %s position of %s lots is open: exit it before a %s entry',
                              open_side, open_lots, s.side);
            elsif s.type = 'PYRAMID' and open_side is distinct from s.side then
                why := format('nothing open on the %s side to add to', s.side);
            end if;
            if why is not null and s.received_at > now() - p_reorder then
                status := 'deferred';
                return next;
                return;
            end if;
            lots := s.lots;
            new_lots := open_lots + lots;
            if why is null and max_lots is not null and new_lots > max_lots then
                why := format('it would hold %s lots, above max_lots %s', new_lots, max_lots);
            end if;
            if why is not null then
                status := 'rejected';
                perform gateway.end_signal(s, status, p_epoch, p_instance, why);
                return next;
                continue;
            end if;
        end if;

        status := 'executing';
        start_position := case open_side when 'short' then -open_lots else open_lots end * lot_size;
        target_position := case s.side when 'short' then -new_lots else new_lots end * lot_size;
        action := gateway.order_action(start_position, target_position);
        client_order_id := gateway.next_client_order_id(s.id, p_epoch);
        if spec ? 'contract' then
            contract := coalesce(
                (select min(p.contract) from gateway.positions p
                  where p.instrument = p_instrument and p.status = 'open'),
                spec ->> 'contract');
        end if;
        update gateway.signals set status = 'executing', claimed_epoch = p_epoch,
               claimed_by = p_instance, claimed_at = now(), updated_at = now(), detail = null
         where id = s.id;
        insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id, action,
                                    quantity, side, lots, start_position, target_position,
                                    instrument, symbol)
        values (s.id, p_epoch, p_instance, p_broker, client_order_id, action,
                abs(target_position - start_position), s.side, lots, start_position,
                target_position, p_instrument, contract);
        return next;
        return;
    end loop;
end
$$;

-- The executor's claim: the instruments of the given signals, under epoch p_epoch
-- of p_election. Fenced first (pgleader.check_epoch raises PGL01 for a stale epoch,
-- and nothing is claimed). Each instrument is claimed under a transaction lock of
-- its own (two claims of one instrument never interleave), in name order (no
-- deadlock), by gateway.claim_instrument, whose rows it returns (`acted`): signals
-- of those instruments that it claimed or ended, which may include signals not
-- asked for (an earlier one of the same instrument goes first). A signal asked for
-- that was not pending comes back as it is, not acted on (status null: no such
-- signal). A pending one asked for and not in the result waits (its instrument has
-- an order in flight or a signal ahead).
create or replace function gateway.claim_signals(
    p_election text, p_epoch bigint, p_ids bigint[], p_instance text, p_broker text,
    p_max_age interval, p_instruments jsonb, p_reorder interval, p_halt_action text
) returns table (
    signal_id bigint, acted boolean, status text, client_order_id text, instrument text,
    side text, action text, start_position bigint, target_position bigint, price numeric,
    contract text
) language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    name text;
    halt text;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    select h.mode into halt from gateway.trading_halt h;
    return query
    select t.id, false, s.status, null::text, s.instrument, s.side, null::text, null::bigint,
           null::bigint, s.price, null::text
      from unnest(p_ids) as t (id) left join gateway.signals s on s.id = t.id
     where s.status is distinct from 'pending';
    for name in select distinct s.instrument from gateway.signals s
                 where s.id = any(p_ids) and s.status = 'pending' order by 1 loop
        perform pg_advisory_xact_lock(1735815534, hashtext(name));  -- 'gwin', the instrument
        return query
        select c.signal_id, true, c.status, c.client_order_id, name, c.side, c.action,
               c.start_position, c.target_position, c.price, c.contract
          from gateway.claim_instrument(name, p_epoch, p_instance, p_broker, p_max_age,
                                        p_instruments, p_reorder, coalesce(halt, 'running'),
                                        p_halt_action) c;
    end loop;
end
$$;
revoke execute on function gateway.claim_signals(
    text, bigint, bigint[], text, text, interval, jsonb, interval, text) from public;
drop function if exists gateway.claim_signals(text, bigint, bigint[], text, text, interval);
drop function if exists gateway.claim_signal(bigint, bigint, text, text, interval);


-- Recording what the broker said ------------------------------------------------

-- Record what the broker said about one order and finish its signal:
--   filled, matched       executed; the ledger moves to the order's target
--   rejected              failed, with an alert
--   awaiting_approval     awaiting_approval, with an alert (a human approves it at
--                         the broker; the ledger does not move)
-- Idempotent: a signal no longer 'executing' is left alone. Null for an unknown
-- client order id. p_symbol: where the order traded (exchange:symbol:product).
create or replace function gateway.complete_order(
    p_client_order_id text, p_outcome text, p_broker_order_id text, p_detail text,
    p_symbol text default null
) returns text language plpgsql as $$
declare
    o gateway.orders;
    s gateway.signals;
    final text;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    if not found then
        return null;
    end if;
    select * into s from gateway.signals where id = o.signal_id for update;
    if s.status <> 'executing' then
        return s.status;
    end if;
    final := case p_outcome when 'filled' then 'executed' when 'matched' then 'executed'
                            when 'awaiting_approval' then 'awaiting_approval' else 'failed' end;
    update gateway.orders set outcome = p_outcome, broker_order_id = p_broker_order_id,
           detail = p_detail, symbol = coalesce(p_symbol, symbol), updated_at = now()
     where id = o.id;
    update gateway.signals set status = final, finished_at = now(), updated_at = now(),
           detail = p_detail
     where id = s.id;
    if final = 'executed' then
        o.symbol := coalesce(p_symbol, o.symbol);
        perform gateway.book_fill(s, o);
    elsif final = 'awaiting_approval' then
        perform gateway.raise_alert('order_awaiting_approval', s.id, o.instance_id,
            format('%s %s to %s at %s awaits approval at the broker: %s', o.action, s.instrument,
                   o.target_position, o.broker, p_detail));
    else
        perform gateway.raise_alert('order_rejected', s.id, o.instance_id,
            format('%s %s rejected by %s: %s', o.action, s.instrument, o.broker, p_detail));
    end if;
    return final;
end
$$;

-- The executor's record of a batch: the broker's answers for many orders at once
-- (five parallel arrays), in the order given; returns each order's signal status.
-- Each order's signal status, and seconds from the signal's arrival to now (its
-- received -> executed latency, for /metrics). plpgsql, not sql: a SQL function with a
-- SET clause is planned again at every call (260 us a call here, 70 us in plpgsql).
drop function if exists gateway.complete_orders(text[], text[], text[], text[], text[]);
create function gateway.complete_orders(
    p_client_order_ids text[], p_outcomes text[], p_broker_order_ids text[], p_details text[],
    p_symbols text[]
) returns table (client_order_id text, status text, since_received float8) language plpgsql
security definer set search_path = pg_catalog, pg_temp as $$
begin
    return query
    select t.coid, gateway.complete_order(t.coid, t.outcome, t.broker_order_id, t.detail, t.symbol),
           extract(epoch from clock_timestamp() - s.received_at)::float8
      from unnest(p_client_order_ids, p_outcomes, p_broker_order_ids, p_details, p_symbols)
           with ordinality as t (coid, outcome, broker_order_id, detail, symbol, n)
      left join gateway.orders o on o.client_order_id = t.coid
      left join gateway.signals s on s.id = o.signal_id
     order by t.n;
end
$$;
revoke execute on function gateway.complete_orders(text[], text[], text[], text[], text[])
    from public;
drop function if exists gateway.complete_orders(text[], text[], text[], text[]);
drop function if exists gateway.complete_order(text, text, text, text);


-- When the broker did not say ----------------------------------------------------

-- The order was not placed (the broker refused it for now, or never got it): mark
-- it and put the signal back in the queue. Run inside a fenced transaction by the
-- leader.
create or replace function gateway.requeue_signal(p_client_order_id text, p_detail text)
returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    o gateway.orders;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    update gateway.orders set outcome = 'not_sent', detail = p_detail, updated_at = now()
     where id = o.id and outcome in ('sending', 'unknown');
    update gateway.signals set status = 'pending', claimed_epoch = null, claimed_by = null,
           claimed_at = null, updated_at = now(), detail = p_detail
     where id = o.signal_id and status = 'executing';
    return found;
end
$$;
revoke execute on function gateway.requeue_signal(text, text) from public;
drop function if exists gateway.requeue_signal(text);

-- Nothing can be sent safely, or the broker cannot tell what happened: stop, and
-- page a human. p_sent: whether the order may have reached the broker (its outcome
-- 'unknown') or surely did not ('not_sent': the broker's position was not the
-- ledger's, so a target order would have traded someone else's position).
create or replace function gateway.mark_in_doubt(p_client_order_id text, p_detail text,
                                                 p_sent boolean default true)
returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    o gateway.orders;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    update gateway.orders set outcome = case when p_sent then 'unknown' else 'not_sent' end,
           detail = p_detail, updated_at = now()
     where id = o.id;
    update gateway.signals set status = 'in_doubt', finished_at = now(), updated_at = now(),
           detail = p_detail
     where id = o.signal_id and status = 'executing';
    if found then
        perform gateway.raise_alert('signal_in_doubt', o.signal_id, o.instance_id, p_detail);
    end if;
    return found;
end
$$;
revoke execute on function gateway.mark_in_doubt(text, text, boolean) from public;
drop function if exists gateway.mark_in_doubt(text, text);


-- The kill switch ---------------------------------------------------------------------

-- Halt ('halted': nothing is sent; 'entries_only': exits still go out) or resume
-- ('running'). Stored, so it survives a failover and a restart; the claim reads it.
-- Returns the mode before. An alert and a NOTIFY tell everyone. 'rewound' (the
-- database went back in time, see the rewind guard in service/watermark.py) is
-- set here too, but left only by resume_after_rewind: any other change is ignored
-- (the mode before, 'rewound', tells the caller so).
create or replace function gateway.set_trading_halt(p_mode text, p_reason text, p_by text)
returns text language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    before text;
begin
    select mode into before from gateway.trading_halt for update;
    if before = 'rewound' then
        return before;
    end if;
    update gateway.trading_halt set mode = p_mode, reason = p_reason, changed_by = p_by,
           changed_at = now();
    if before is distinct from p_mode then
        perform gateway.raise_alert(case p_mode when 'running' then 'trading_resumed'
                                                when 'rewound' then 'database_rewound'
                                                else 'trading_halted' end,
            null, p_by, case p_mode
                when 'rewound' then format('trading halted by %s: %s', p_by, p_reason)
                else format('trading %s by %s%s', replace(p_mode, '_', ' '), p_by,
                            coalesce(': ' || p_reason, '')) end);
        perform pg_notify('gateway_signals', 'halt');
    end if;
    return before;
end
$$;
revoke execute on function gateway.set_trading_halt(text, text, text) from public;

-- An operator settles by hand a signal the gateway could not: one 'in_doubt' (the
-- broker could not say whether its order went through, or the broker's position was
-- not the ledger's and nothing was sent) or 'awaiting_approval' (a human approves or
-- declines the order at the broker). The operator looked at the broker's order book:
--   p_filled true   the order filled: the signal 'executed', its order 'filled', and
--                   the ledger moves as it would have (book_fill)
--   p_filled false  it did not: the signal 'failed', its order 'rejected' (one never
--                   sent stays 'not_sent'); the ledger does not move
-- Either way an alert (signal_settled) says who settled what, and why. Refused, with
-- nothing changed and `refused` saying why: an unknown signal, one in another status,
-- 'filled' for an order never sent, and 'filled' when a later order of the instrument
-- filled: that order was sent only because the broker's position was the ledger's
-- without this one, so this one cannot have filled. Holds the instrument's claim
-- lock, so no claim reads the ledger halfway. Returns the status before and after, the
-- instrument, and its net position in the ledger after (lots, negative for short).
create or replace function gateway.settle_signal(
    p_signal_id bigint, p_filled boolean, p_reason text, p_by text,
    out refused text, out before text, out status text, out instrument text,
    out ledger_lots bigint
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    s gateway.signals;
    o gateway.orders;
    later bigint;
    how text := case when p_filled then 'filled' else 'not filled' end;
    why text;
begin
    select x.instrument into instrument from gateway.signals x where x.id = p_signal_id;
    if not found then
        refused := format('no signal %s', p_signal_id);
        return;
    end if;
    perform pg_advisory_xact_lock(1735815534, hashtext(instrument));  -- the claim's lock
    select * into s from gateway.signals x where x.id = p_signal_id for update;
    before := s.status;
    if s.status not in ('in_doubt', 'awaiting_approval') then
        refused := format('signal %s is %s, not in doubt or awaiting approval: only those'
                          ' are settled by hand', s.id, s.status)
                   || case when s.status = 'executing' then
                          ' (the leader settles an executing one with the broker)' else '' end;
        return;
    end if;
    select * into o from gateway.orders x where x.signal_id = s.id order by x.id desc limit 1;
    if p_filled and (o.id is null or o.outcome = 'not_sent') then
        refused := format('signal %s had no order sent (%s): it cannot have filled; settle it'
                          ' as not filled', s.id, coalesce(s.detail, 'no detail'));
        return;
    end if;
    if p_filled then
        select x.signal_id into later from gateway.orders x  -- orders_instrument_idx
         where x.instrument = s.instrument and x.created_at >= o.created_at and x.id > o.id
           and x.signal_id is not null and x.outcome in ('filled', 'matched')
         order by x.id limit 1;
        if found then
            refused := format('signal %s of %s was executed after signal %s, which its order'
                              ' needed the broker''s position to match the ledger without: %s'
                              ' cannot have filled; settle it as not filled', later,
                              s.instrument, s.id, s.id);
            return;
        end if;
    end if;
    why := format('settled by hand as %s by %s: %s (was %s: %s)', how, p_by, p_reason,
                  replace(s.status, '_', ' '), coalesce(s.detail, 'no detail'));
    status := case when p_filled then 'executed' else 'failed' end;
    update gateway.signals x set status = settle_signal.status, finished_at = now(),
           updated_at = now(), detail = left(why, 2000)
     where x.id = s.id;
    if o.id is not null then
        update gateway.orders x
           set outcome = case when p_filled then 'filled'
                              when o.outcome = 'not_sent' then 'not_sent' else 'rejected' end,
               detail = left(why, 2000), updated_at = now()
         where x.id = o.id;
    end if;
    if p_filled then
        perform gateway.book_fill(s, o);
    end if;
    select coalesce(n.net_lots, 0) into ledger_lots
      from (select 1) one left join gateway.net_positions n on n.instrument = s.instrument;
    perform gateway.raise_alert('signal_settled', s.id, p_by,
        format('%s %s %s %s %s', s.type, s.side, s.instrument, s.position, why));
end
$$;
revoke execute on function gateway.settle_signal(bigint, boolean, text, text) from public;

-- An operator, having reconciled the broker's positions with the ledger, lets
-- trading go on after the database went back in time. before: the mode before.
--
-- A signal the database held before it was found rewound and still shows open
-- (pending, or executing under an old claim) may have been executed by the lost
-- commits: sent again, it would repeat an order the broker has (a second entry, or
-- an entry after its exit). So while any is open, nothing changes unless p_open says
-- what to do with them: 'end' (never sent: rejected, an order of theirs still
-- 'sending' becomes 'unknown') or 'requeue' (executed as usual: the reconciliation
-- showed the lost commits never sent them). open_signals lists them either way;
-- resumed is false when p_open was needed and missing.
drop function if exists gateway.resume_after_rewind(text);
create or replace function gateway.resume_after_rewind(
    p_by text, p_open text default null,
    out before text, out open_signals bigint[], out resumed boolean
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    since timestamptz;
    why constant text := 'not sent: held before the database went back in time (the lost'
        ' commits may have executed it); ended by the operator at resume --after-rewind';
begin
    if p_open is not null and p_open not in ('end', 'requeue') then
        raise exception 'p_open must be end or requeue, not %', p_open using errcode = '22023';
    end if;
    select h.mode, h.changed_at into before, since from gateway.trading_halt h for update;
    open_signals := '{}';
    if before = 'rewound' then
        select coalesce(array_agg(s.id order by s.id), '{}') into open_signals
          from gateway.signals s
         where s.status in ('pending', 'executing') and s.received_at < since;
        if cardinality(open_signals) > 0 and p_open is null then
            resumed := false;
            return;
        end if;
        if p_open = 'end' then
            update gateway.orders o set outcome = 'unknown', detail = why, updated_at = now()
             where o.signal_id = any(open_signals) and o.outcome = 'sending';
            update gateway.signals s set status = 'rejected', finished_at = now(),
                   updated_at = now(), detail = why
             where s.id = any(open_signals) and s.status in ('pending', 'executing');
        end if;
    end if;
    update gateway.trading_halt set mode = 'running', reason = null, changed_by = p_by,
           changed_at = now();
    resumed := true;
    if before is distinct from 'running' then
        perform gateway.raise_alert('trading_resumed', null, p_by,
            format('trading resumed by %s after the database went back in time%s', p_by,
                   case when cardinality(open_signals) = 0 then ''
                        else format('; %s signal(s) held from before it %s: %s',
                                    cardinality(open_signals),
                                    case p_open when 'end' then 'ended unsent'
                                                else 'requeued' end,
                                    array_to_string(open_signals[1:20], ', ')) end));
        perform pg_notify('gateway_signals', 'halt');
    end if;
end
$$;
revoke execute on function gateway.resume_after_rewind(text, text) from public;


-- Reconciliation with the broker --------------------------------------------------

-- Ask the leader for a reconciliation run; returns its id (the run fills the row).
create or replace function gateway.request_reconciliation(p_trigger text, p_by text)
returns bigint language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    id bigint;
begin
    insert into gateway.reconciliations (requested_by, trigger) values (p_by, p_trigger)
    returning reconciliations.id into id;
    perform pg_notify('gateway_signals', 'reconcile');
    return id;
end
$$;
revoke execute on function gateway.request_reconciliation(text, text) from public;

-- Record a run's result (items: [{instrument, outcome, ledger, broker}]), with an
-- alert per item that is not matched. Fenced by the caller's transaction.
create or replace function gateway.finish_reconciliation(
    p_id bigint, p_epoch bigint, p_instance text, p_outcome text, p_items jsonb, p_detail text
) returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    item jsonb;
begin
    update gateway.reconciliations set epoch = p_epoch, instance_id = p_instance,
           finished_at = now(), outcome = p_outcome, items = coalesce(p_items, '[]'),
           detail = p_detail
     where id = p_id and outcome is null;
    if not found then
        return;
    end if;
    for item in select * from jsonb_array_elements(coalesce(p_items, '[]')) loop
        if item ->> 'outcome' <> 'matched' then
            perform gateway.raise_alert('reconciliation_' || (item ->> 'outcome'), null, p_instance,
                format('%s: ledger %s, broker %s', item ->> 'instrument', item ->> 'ledger',
                       item ->> 'broker'));
        end if;
    end loop;
    if p_outcome = 'failed' then
        perform gateway.raise_alert('reconciliation_failed', null, p_instance, p_detail);
    end if;
end
$$;
revoke execute on function gateway.finish_reconciliation(bigint, bigint, text, text, jsonb, text)
    from public;


-- Instances agree on what they trade -----------------------------------------------

create or replace function gateway.record_settings(p_election text, p_instance text,
                                                   p_fingerprint text)
returns void language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into gateway.instance_settings (election, instance_id, fingerprint)
    values (p_election, p_instance, p_fingerprint)
    on conflict (election, instance_id) do update
       set fingerprint = excluded.fingerprint, updated_at = now()
$$;
revoke execute on function gateway.record_settings(text, text, text) from public;


-- What an operator reads ------------------------------------------------------------

-- How many signals in which state, and the oldest waiting: what an operator asks first.
create or replace view gateway.signal_summary as
select status, count(*) as signals, min(received_at) as oldest_received, max(received_at) as newest_received
  from gateway.signals group by status;

-- Signals left 'executing', with the order each was sent as: reconciliation's work list.
create or replace view gateway.executing as
select s.id as signal_id, s.claimed_epoch, s.claimed_by, s.claimed_at, o.client_order_id, o.outcome,
       s.instrument, o.start_position, o.target_position, o.symbol
  from gateway.signals s
  join lateral (select * from gateway.orders o where o.signal_id = s.id order by o.id desc limit 1) o on true
 where s.status = 'executing';


-- The leader's jobs (service/jobs/) -------------------------------------------------

-- Retention: delete up to p_batch terminal signals that ended more than
-- p_older_than ago, oldest first, never one an open position refers to. Orders,
-- positions and alerts keep their rows (their reference becomes null). Fenced.
-- Returns the number deleted (fewer than p_batch: nothing more to do).
create or replace function gateway.delete_old_signals(
    p_election text, p_epoch bigint, p_older_than interval, p_batch integer
) returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    deleted integer;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    delete from gateway.signals d
     where d.id in (
        select s.id from gateway.signals s
         where s.status in ('executed', 'failed', 'rejected', 'expired')
           and s.finished_at < now() - p_older_than
           and not exists (select from gateway.positions p
                            where p.status = 'open' and p.signal_id = s.id)
         order by s.finished_at
         limit p_batch
           for update skip locked);
    get diagnostics deleted = row_count;
    return deleted;
end
$$;
revoke execute on function gateway.delete_old_signals(text, bigint, interval, integer) from public;

-- Stale instances leave the gateway's settings registry with pgleader's. Fenced.
create or replace function gateway.prune_instance_settings(
    p_election text, p_epoch bigint, p_instances text[]
) returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    deleted integer;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    delete from gateway.instance_settings
     where election = p_election and instance_id = any(p_instances);
    get diagnostics deleted = row_count;
    return deleted;
end
$$;
revoke execute on function gateway.prune_instance_settings(text, bigint, text[]) from public;

-- Statistics: what the leader computes for GET /statistics and `pgleader stats`
-- (realised P&L is added by the job, which knows the lot sizes), stored in the one
-- row of gateway.portfolio_state. Fenced.
create or replace function gateway.compute_statistics(p_election text, p_days integer)
returns jsonb language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    first_day date := ((now() - make_interval(days => p_days)) at time zone 'UTC')::date;
    since date := first_day;  -- days from here on are counted again
    previous jsonb;
    made timestamptz;
begin
    -- Signals by day, incrementally: a day whose signals have all ended and none
    -- ended since the last run keeps the counts that run stored, so a run reads
    -- the last day or two of signals, not the whole history (millions of rows).
    select ps.statistics -> 'signals_by_day', ps.refreshed_at into previous, made
      from gateway.portfolio_state ps;
    if jsonb_typeof(previous) = 'array' and made is not null then
        since := greatest(first_day, least(
            (now() at time zone 'UTC')::date - 1,
            (select (min(s.received_at) at time zone 'UTC')::date from gateway.signals s
              where s.status in ('pending', 'executing', 'in_doubt', 'awaiting_approval')),
            (select (min(s.received_at) at time zone 'UTC')::date from gateway.signals s
              where s.status in ('executed', 'failed', 'rejected', 'expired')
                and s.finished_at >= made - interval '1 minute')));
    end if;
    return jsonb_build_object(
        'signals_by_day', coalesce((
            select jsonb_agg(d order by d ->> 'day' desc, d ->> 'type', d ->> 'status')
              from (select d from jsonb_array_elements(previous) d
                     where since > first_day
                       and (d ->> 'day')::date >= first_day and (d ->> 'day')::date < since
                    union all
                    select jsonb_build_object('day', day, 'type', type, 'status', status,
                                              'signals', n)
                      from (select (received_at at time zone 'UTC')::date as day, type,
                                   status, count(*) as n
                              from gateway.signals
                             where received_at >= since::timestamp at time zone 'UTC'
                             group by 1, 2, 3) x) days(d)), '[]'),
        'orders_by_outcome', coalesce((
            select jsonb_object_agg(outcome, n)
              from (select outcome, count(*) as n from gateway.orders group by 1) x), '{}'),
        'open_positions', coalesce((
            select jsonb_agg(jsonb_build_object('instrument', instrument, 'side', side,
                                                'lots', lots, 'entries', entries,
                                                'contract', contract) order by instrument)
              from (select instrument, side, sum(lots) as lots, count(*) as entries,
                           min(contract) as contract
                      from gateway.positions where status = 'open' group by 1, 2) x), '[]'),
        'closed_by_instrument', coalesce((
            select jsonb_agg(jsonb_build_object('instrument', instrument, 'side', side,
                             'points_x_lots', points, 'priced', priced, 'unpriced', unpriced)
                             order by instrument, side)
              from (select p.instrument, p.side,
                           sum(case when p.side = 'short' then -1 else 1 end
                               * (x.price - p.entry_price) * p.lots) as points,
                           count(*) filter (where x.price is not null
                                            and p.entry_price is not null) as priced,
                           count(*) filter (where x.price is null or p.entry_price is null)
                               as unpriced
                      from gateway.positions p
                      left join gateway.signals x on x.id = p.exit_signal_id
                     where p.status = 'closed' group by 1, 2) y), '[]'),
        'leadership_changes_by_day', coalesce((
            select jsonb_agg(jsonb_build_object('day', day, 'changes', n) order by day desc)
              from (select (acquired_at at time zone 'UTC')::date as day, count(*) as n
                      from pgleader.leadership_history
                     where election = p_election
                       and acquired_at >= now() - make_interval(days => p_days)
                     group by 1) x), '[]'),
        'last_reconciliation', (
            select jsonb_build_object('id', id, 'outcome', outcome, 'finished_at', finished_at,
                                      'trigger', trigger)
              from gateway.reconciliations where outcome is not null
             order by finished_at desc limit 1),
        'in_doubt', (select count(*) from gateway.signals where status = 'in_doubt'),
        'rollovers', coalesce((
            select jsonb_object_agg(state, n)
              from (select state, count(*) as n from gateway.rollovers group by 1) x), '{}'));
end
$$;

create or replace function gateway.store_statistics(
    p_election text, p_epoch bigint, p_instance text, p_statistics jsonb
) returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    update gateway.portfolio_state
       set statistics = p_statistics, refreshed_at = now(), epoch = p_epoch,
           instance_id = p_instance;
end
$$;
revoke execute on function gateway.store_statistics(text, bigint, text, jsonb) from public;


-- Futures rollover (service/jobs/rollover.py) -----------------------------------------

-- Open a roll of an instrument's whole open position from its contract to the
-- next: only with no order of it in flight (its claim lock is taken, as a claim's)
-- and no other roll active. The job runs this in a SERIALIZABLE transaction.
-- Returns the roll's id, or null when there is nothing to roll now. Fenced.
create or replace function gateway.start_rollover(
    p_election text, p_epoch bigint, p_instance text, p_instrument text,
    p_from_contract text, p_from_expiry date, p_to_contract text, p_to_expiry date,
    p_lot_size bigint
) returns bigint language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    open_side text;
    open_lots bigint;
    held text;
    id bigint;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    perform pg_advisory_xact_lock(1735815534, hashtext(p_instrument));  -- the claim's lock
    if exists (select from gateway.signals s
                where s.instrument = p_instrument and s.status = 'executing')
       or exists (select from gateway.rollovers r
                   where r.instrument = p_instrument and r.state in ('due', 'exiting', 'entering'))
    then
        return null;
    end if;
    select min(p.side), sum(p.lots), min(p.contract) into open_side, open_lots, held
      from gateway.positions p where p.instrument = p_instrument and p.status = 'open';
    if open_lots is null or open_lots = 0 or held is distinct from p_from_contract then
        return null;
    end if;
    insert into gateway.rollovers as r (instrument, from_contract, from_expiry, to_contract,
                                        to_expiry, side, lots, units, epoch, instance_id)
    values (p_instrument, p_from_contract, p_from_expiry, p_to_contract, p_to_expiry, open_side,
            open_lots, open_lots * p_lot_size, p_epoch, p_instance)
    returning r.id into id;
    update gateway.positions set rollover_status = 'due'
     where instrument = p_instrument and status = 'open';
    return id;
end
$$;
revoke execute on function gateway.start_rollover(
    text, bigint, text, text, text, date, text, date, bigint) from public;

-- A roll's step: 'exiting' or 'entering' (with a detail). Fenced.
create or replace function gateway.set_rollover_state(
    p_election text, p_epoch bigint, p_id bigint, p_state text, p_detail text
) returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    update gateway.rollovers set state = p_state, detail = p_detail, epoch = p_epoch,
           updated_at = now()
     where id = p_id and state in ('due', 'exiting', 'entering');
end
$$;
revoke execute on function gateway.set_rollover_state(text, bigint, bigint, text, text) from public;

-- The order of a roll's step, booked before it is sent (as every order). Fenced.
-- Returns its client order id and action.
create or replace function gateway.book_rollover_order(
    p_election text, p_epoch bigint, p_instance text, p_broker text, p_id bigint,
    p_step text, p_contract text, p_start bigint, p_target bigint,
    out coid text, out action text
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    r gateway.rollovers;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    select * into r from gateway.rollovers where id = p_id;
    coid := gateway.client_order_id(format('roll%s-%s', p_id, p_step), p_epoch,
                  (select count(*) + 1 from gateway.orders o where o.rollover_id = p_id));
    action := gateway.order_action(p_start, p_target);
    insert into gateway.orders (signal_id, rollover_id, epoch, instance_id, broker,
                                client_order_id, action, quantity, side, lots, start_position,
                                target_position, instrument, symbol)
    values (null, p_id, p_epoch, p_instance, p_broker, coid, action, abs(p_target - p_start),
            r.side, r.lots, p_start, p_target, r.instrument, p_contract);
end
$$;
revoke execute on function gateway.book_rollover_order(
    text, bigint, text, text, bigint, text, text, bigint, bigint) from public;

-- What the broker said of a roll's order.
create or replace function gateway.record_rollover_order(
    p_client_order_id text, p_outcome text, p_broker_order_id text, p_detail text
) returns void language sql security definer set search_path = pg_catalog, pg_temp as $$
    update gateway.orders set outcome = p_outcome, broker_order_id = p_broker_order_id,
           detail = p_detail, updated_at = now()
     where client_order_id = p_client_order_id and rollover_id is not null
$$;
revoke execute on function gateway.record_rollover_order(text, text, text, text) from public;

-- The roll is done at the broker: the ledger's open position moves to the new
-- contract, the roll ends 'rolled', an alert says so. Run in a SERIALIZABLE
-- transaction. Fenced.
create or replace function gateway.finish_rollover(
    p_election text, p_epoch bigint, p_instance text, p_id bigint
) returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    r gateway.rollovers;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    select * into r from gateway.rollovers where id = p_id for update;
    if r.state not in ('due', 'exiting', 'entering') then
        return false;
    end if;
    update gateway.positions
       set contract = r.to_contract, expiry = r.to_expiry, rollover_status = 'rolled'
     where instrument = r.instrument and status = 'open';
    update gateway.rollovers set state = 'rolled', finished_at = now(), updated_at = now(),
           epoch = p_epoch, detail = null
     where id = p_id;
    perform gateway.raise_alert('rollover_completed', null, p_instance,
        format('%s: %s %s lots rolled from %s to %s', r.instrument, r.side, r.lots,
               r.from_contract, r.to_contract));
    return true;
end
$$;
revoke execute on function gateway.finish_rollover(text, bigint, text, bigint) from public;

-- Rolls of the instruments: every active one, and each instrument's open contract.
create or replace view gateway.open_contracts as
select instrument, min(side) as side, sum(lots) as lots, min(contract) as contract,
       min(expiry) as expiry, count(distinct contract) as contracts
  from gateway.positions where status = 'open'
 group by instrument;


-- Alert delivery (service/alerts/delivery.py) ----------------------------------------

-- The leader's start: record the sinks it is configured with (a sink enabled now
-- gets the transitions from this epoch on, not the history before; one it lacks is
-- disabled: no alert is queued for it), and queue every transition since each sink
-- was enabled that has no delivery yet (epochs commit in order: none is skipped,
-- whoever led meanwhile). Fenced. Returns the transitions queued.
create or replace function gateway.start_alert_delivery(
    p_election text, p_epoch bigint, p_instance text, p_sinks text[]
) returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    queued integer;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    insert into gateway.alert_sinks as s (sink, election, since_epoch, registered_by)
    select distinct unnest(p_sinks), p_election, p_epoch, p_instance
    on conflict (sink) do update
       set enabled = true, registered_at = now(), registered_by = excluded.registered_by,
           election = excluded.election,
           since_epoch = case when s.enabled and s.election = excluded.election
                              then s.since_epoch else excluded.since_epoch end;
    update gateway.alert_sinks s set enabled = false
     where s.enabled and s.sink <> all(p_sinks);
    insert into gateway.alert_deliveries (sink, election, epoch)
    select s.sink, h.election, h.epoch
      from gateway.alert_sinks s
      join pgleader.leadership_history h on h.election = s.election and h.epoch >= s.since_epoch
     where s.enabled
       and not exists (select from gateway.alert_deliveries d
                        where d.sink = s.sink and d.election = h.election and d.epoch = h.epoch)
     order by h.epoch
    on conflict do nothing;
    get diagnostics queued = row_count;
    return queued;
end
$$;
revoke execute on function gateway.start_alert_delivery(text, bigint, text, text[]) from public;

-- Claim what a sink is due to be sent, at most p_limit deliveries, oldest first, as
-- one message: nothing while the sink's group interval (or a 429's retry-after)
-- runs, which then starts again. A delivery is due when its next attempt has come,
-- or when another epoch claimed it and never recorded the outcome (its leader died
-- mid-send). A claim without a recorded outcome, or an attempt without an answer,
-- may have reached the sink: the delivery is sent again as a repeat. Fenced.
-- Returns each delivery with its event: an alert, or a leadership transition (the
-- leader elected, and how the epoch before it ended).
create or replace function gateway.claim_alert_deliveries(
    p_election text, p_epoch bigint, p_instance text, p_sink text,
    p_group_interval double precision, p_limit integer
) returns table (
    delivery_id bigint, is_repeat boolean, event_kind text, event_detail text,
    event_at timestamptz, event_instance text, event_signal_id bigint, event_election text,
    event_epoch bigint, previous_leader text, previous_epoch bigint, previous_reason text
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    ids bigint[];
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    perform from gateway.alert_sinks s
     where s.sink = p_sink and s.enabled and s.next_send_at <= now() for update;
    if not found then
        return;
    end if;
    select array_agg(x.id order by x.id) into ids from (
        select d.id from gateway.alert_deliveries d
         where d.sink = p_sink and d.delivered_at is null and d.failed_at is null
           and (d.next_attempt_at <= now() or d.claimed_epoch <> p_epoch)
         order by d.id limit p_limit
           for update skip locked) x;
    if ids is null then
        return;
    end if;
    update gateway.alert_deliveries d
       set attempts = d.attempts + 1,
           repeat = d.maybe_sent or d.claimed_epoch is not null,
           maybe_sent = d.maybe_sent or d.claimed_epoch is not null,
           claimed_epoch = p_epoch, claimed_by = p_instance, claimed_at = now(),
           -- should its outcome never be recorded by this epoch
           next_attempt_at = now() + interval '5 minutes',
           group_id = case when cardinality(ids) > 1 then ids[1] end
     where d.id = any(ids);
    update gateway.alert_sinks s
       set next_send_at = now() + make_interval(secs => p_group_interval)
     where s.sink = p_sink;
    return query
        select d.id, d.repeat, coalesce(a.kind, 'leader_elected'), a.detail,
               coalesce(a.created_at, h.acquired_at), coalesce(a.instance_id, h.instance_id),
               a.signal_id, d.election, d.epoch, p.instance_id, p.epoch, p.release_reason
          from gateway.alert_deliveries d
          left join gateway.alerts a on a.id = d.alert_id
          left join pgleader.leadership_history h
            on h.election = d.election and h.epoch = d.epoch
          left join lateral (
                select ph.instance_id, ph.epoch, ph.release_reason
                  from pgleader.leadership_history ph
                 where ph.election = d.election and ph.epoch < d.epoch
                 order by ph.epoch desc limit 1) p on true
         where d.id = any(ids)
         order by d.id;
end
$$;
revoke execute on function gateway.claim_alert_deliveries(text, bigint, text, text, double precision, integer) from public;

-- Record how the send of claimed deliveries went: 'delivered'; 'failed' (not sent:
-- retried after a backoff of p_retry_s doubled per attempt, at most 5 min);
-- 'unknown' (no answer: the same, and later sends are repeats); 'rate_limited'
-- (a 429: the sink gets nothing for p_retry_s); 'refused' (a 4xx but 429, given up
-- after p_give_up_after refusals, with an alert to the other sinks, unless what was
-- given up is itself such an alert: no loop of alerts about alerts). Only deliveries
-- still claimed by p_epoch change: a successor that claimed them again decides.
-- Returns the deliveries given up.
create or replace function gateway.finish_alert_deliveries(
    p_epoch bigint, p_instance text, p_sink text, p_ids bigint[], p_outcome text,
    p_error text, p_retry_s double precision, p_give_up_after integer
) returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    given_up bigint[];
    events text;
begin
    if p_outcome not in ('delivered', 'failed', 'unknown', 'rate_limited', 'refused') then
        raise exception 'gateway: unknown delivery outcome %', p_outcome using errcode = '22023';
    end if;
    if p_outcome = 'delivered' then
        update gateway.alert_deliveries d set delivered_at = now()
         where d.id = any(p_ids) and d.sink = p_sink and d.claimed_epoch = p_epoch
           and d.delivered_at is null;
        return 0;
    end if;
    if p_outcome = 'rate_limited' then
        update gateway.alert_sinks s
           set next_send_at = greatest(s.next_send_at, now() + make_interval(secs => p_retry_s))
         where s.sink = p_sink;
    end if;
    with changed as (
        update gateway.alert_deliveries d
           set claimed_epoch = null,
               maybe_sent = d.maybe_sent or p_outcome = 'unknown',
               last_error = left(p_error, 500),
               refusals = d.refusals + (p_outcome = 'refused')::int,
               next_attempt_at = now() + make_interval(secs => case p_outcome
                   when 'rate_limited' then p_retry_s
                   else least(p_retry_s * power(2, least(d.attempts - 1, 20)), 300) end),
               failed_at = case when p_outcome = 'refused' and d.refusals + 1 >= p_give_up_after
                                then now() end
         where d.id = any(p_ids) and d.sink = p_sink and d.claimed_epoch = p_epoch
           and d.delivered_at is null
        returning d.id, d.failed_at, d.alert_id, d.election, d.epoch
    )
    select array_agg(c.id order by c.id),
           string_agg(case when c.alert_id is not null
                           then format('alert %s (%s)', c.alert_id, a.kind)
                           else format('transition %s epoch %s', c.election, c.epoch) end,
                      ', ' order by c.id)
                filter (where a.kind is distinct from 'alert_delivery_failed')
      into given_up, events
      from changed c left join gateway.alerts a on a.id = c.alert_id
     where c.failed_at is not null;
    if events is not null then
        perform gateway.record_alert('alert_delivery_failed', null, p_instance,
            format('%s refused %s %s time(s): %s; given up there: %s', p_sink,
                   case when cardinality(given_up) > 1 then 'these' else 'this' end,
                   p_give_up_after,
                   case when starts_with(p_error, p_sink || ': ')
                        then substr(p_error, length(p_sink) + 3) else p_error end,
                   events), p_sink);
    end if;
    return coalesce(cardinality(given_up), 0);
end
$$;
revoke execute on function gateway.finish_alert_deliveries(bigint, text, text, bigint[], text, text, double precision, integer) from public;
