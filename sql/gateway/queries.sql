-- Every statement the gateway runs, by name (loaded by service/queries.py with
-- pgleader's loader).
--
-- Each query starts at a `-- name: <name>` line; the comment lines right after it
-- say what it is for, the rest up to the next header is the statement. Values are
-- psycopg placeholders (%s, %(name)s), never text put into the statement.
-- The gateway.* functions called here are defined in functions.sql, next to this file.


-- The inbox (service/intake/inbox.py) ------------------------------------------

-- name: store_signals
-- Group commit of received signals, %(rows)s a JSON array of them. One row per
-- input, in input order, with the id if this statement inserted it (else null: a
-- duplicate, read back by fingerprint with signal_ids_by_fingerprint; not joined
-- here, as a generic plan would scan the whole table for it). The NOTIFY on
-- gateway_signals lists the new ids whose input asked for it.
with input as (
    select * from jsonb_to_recordset(%(rows)s::jsonb) as t (
        n int, fp text, type text, instrument text, position text, side text, lots int,
        price numeric, stop numeric, signal_at timestamptz, payload jsonb,
        received_at timestamptz, notify bool)
), new as (
    insert into gateway.signals
        (fingerprint, type, instrument, position, side, lots, price, stop, signal_at, payload,
         received_by, received_at)
    select fp, type, instrument, position, side, lots, price, stop, signal_at, payload,
           %(received_by)s, coalesce(received_at, now())
      from input order by n
    on conflict (fingerprint) do nothing
    returning id, fingerprint
), woken as (
    select pg_notify('gateway_signals', string_agg(new.id::text, ',' order by new.id))
      from new
     where exists (select from input where input.fp = new.fingerprint and input.notify)
    having count(*) > 0
)
select input.fp, new.id, (select count(*) from woken)
  from input left join new on new.fingerprint = input.fp
 order by input.n;

-- name: signal_ids_by_fingerprint
-- The ids of signals stored before (a retry, or a concurrent write that committed first).
select fingerprint, id from gateway.signals where fingerprint = any(%s);

-- name: notify_signal
-- Tell the leader of a signal after all (channel, id): the inline execution that
-- skipped the NOTIFY at store time did not happen.
select pg_notify(%s, %s);

-- name: get_signal
-- GET /signals/{id}: a signal with its orders.
select id as signal_id, status, type, instrument, position, side, lots, price, stop,
       signal_at, received_by, received_at, claimed_epoch, claimed_by, finished_at, detail,
       (select json_agg(json_build_object('client_order_id', o.client_order_id,
          'epoch', o.epoch, 'action', o.action, 'quantity', o.quantity,
          'start_position', o.start_position, 'target_position', o.target_position,
          'symbol', o.symbol, 'broker_order_id', o.broker_order_id, 'outcome', o.outcome,
          'detail', o.detail)
          order by o.id) from gateway.orders o where o.signal_id = s.id) as orders
  from gateway.signals s where id = %s;


-- The executor (service/execution/executor.py) ---------------------------------

-- name: claim_signals
-- Fenced claim of the instruments of a batch: pending -> executing, an order booked
-- per instrument (election, epoch, ids, instance, broker, max_age, instruments,
-- reorder window, halt action).
select signal_id, acted, status, client_order_id, instrument, side, action, start_position,
       target_position, price, contract
  from gateway.claim_signals(%s, %s, %s, %s, %s, %s, %s, %s, %s);

-- name: complete_orders
-- Record the broker's answers, by client order id (five parallel arrays): each
-- order's signal status and seconds since the signal was received.
select client_order_id, status, since_received
  from gateway.complete_orders(%s, %s, %s, %s, %s);

-- name: open_signals
-- /metrics: signals not yet ended, by status (signals_open_idx: the history is not
-- read), and the seconds since the oldest of each was received.
select status, count(*)::int,
       extract(epoch from clock_timestamp() - min(received_at))::float8
  from gateway.signals
 where status in ('pending', 'executing', 'in_doubt', 'awaiting_approval')
 group by status;

-- name: status_snapshot
-- The status page (service/status.py): everything it shows, as one JSON object
-- (election, history hours, signals limit, alerts limit, stale-after seconds).
select json_build_object(
  'now', clock_timestamp(),
  'election', (select row_to_json(l) from (
      select election, epoch, leader, host, lock_held, acquired_at, heartbeat_at,
             extract(epoch from heartbeat_age)::float8 as heartbeat_age_s
        from pgleader.leader where election = %(election)s) l),
  'instances', coalesce((select json_agg(i order by i.instance_id) from (
      select instance_id, host, pid, version, started_at, last_heartbeat, is_leader, eligible, priority,
             extract(epoch from clock_timestamp() - last_heartbeat)::float8 as heartbeat_age_s,
             clock_timestamp() - last_heartbeat > make_interval(secs => %(stale_after)s) as stale
        from pgleader.instances where election = %(election)s) i), '[]'::json),
  'timeline', coalesce((select json_agg(h order by h.epoch) from (
      select epoch, instance_id as leader, acquired_at, released_at, release_reason
        from pgleader.leadership_history
       where election = %(election)s
         and coalesce(released_at, 'infinity') > clock_timestamp() - make_interval(hours => %(hours)s)) h),
      '[]'::json),
  'signals', coalesce((select json_agg(x order by x.id desc) from (
      select s.id, s.received_at, s.type, s.instrument, s.position, s.side, s.lots, s.status,
             s.received_by, s.detail,
             coalesce((select json_agg(json_build_object(
                          'client_order_id', o.client_order_id, 'outcome', o.outcome,
                          'symbol', o.symbol, 'target_position', o.target_position) order by o.id)
                         from gateway.orders o where o.signal_id = s.id), '[]'::json) as orders
        from gateway.signals s order by s.id desc limit %(signals)s) x), '[]'::json),
  'positions', coalesce((select json_agg(p order by p.instrument, p.side) from (
      select instrument, side, sum(lots)::int as lots, count(*)::int as entries,
             min(entry_at) as since, min(contract) as contract
        from gateway.positions where status = 'open' group by instrument, side) p), '[]'::json),
  'alerts', coalesce((select json_agg(a order by a.id desc) from (
      select id, kind, signal_id, instance_id, left(detail, 300) as detail, created_at
        from gateway.alerts order by id desc limit %(alerts)s) a), '[]'::json),
  'kill_switch', (select row_to_json(k) from (
      select mode, reason, changed_by, changed_at from gateway.trading_halt) k),
  'reconciliation', (select row_to_json(r) from (
      select id, trigger, outcome, detail, finished_at, instance_id from gateway.reconciliations
       where finished_at is not null order by id desc limit 1) r),
  'jobs', coalesce((select json_agg(j order by j.job) from (
      select job, outcome, finished_at, next_due_at, running, failures, left(result, 200) as result
        from pgleader.job_status where election = %(election)s) j), '[]'::json)
);

-- name: pending_signals
-- The sweep: pending signals, oldest first (a NOTIFY may have been missed).
select id from gateway.signals where status = 'pending' order by received_at limit %s;

-- name: executing_signals
-- Settling: signals left 'executing' and claimed more than %(grace)s ago (the
-- settle time: a broker may finish a request after its client gave up), whatever
-- the epoch (the executor also waits out an older leader's lease).
select signal_id, claimed_epoch, client_order_id, instrument, start_position, target_position,
       claimed_at, symbol
  from gateway.executing
 where claimed_at < now() - %(grace)s
 order by claimed_at limit %(limit)s;

-- name: mark_in_doubt
-- Nothing can be sent safely, or the broker cannot tell what happened: in_doubt,
-- with an alert (client order id, detail, whether it may have been sent).
select gateway.mark_in_doubt(%s, %s, %s);

-- name: requeue_signal
-- The order was not placed: back to pending (run fenced, in a transaction).
select gateway.requeue_signal(%s, %s);

-- name: unknown_broker_orders
-- Of these broker order ids of an instrument (ids, instrument), those no order of
-- ours recorded: placed by someone else, or ours whose answer never came.
select id from unnest(%s::text[]) as t (id)
except
select o.broker_order_id from gateway.orders o
 where o.instrument = %s and o.broker_order_id is not null;

-- name: pending_of_instruments
-- Pending signals of these instruments (what waited behind an order in flight).
select id from gateway.signals where status = 'pending' and instrument = any(%s)
 order by signal_at limit 1000;

-- name: trading_halt
-- The kill switch: mode, reason, who, when.
select mode, reason, changed_by, changed_at from gateway.trading_halt;

-- name: settle_signal
-- `pgleader settle`: a signal in doubt or awaiting approval settled by hand
-- (signal id, filled, reason, by): refused, before, status, instrument, ledger_lots.
select * from gateway.settle_signal(%s, %s, %s, %s);

-- name: set_trading_halt
-- Halt or resume (mode, reason, by); returns the mode before.
select gateway.set_trading_halt(%s, %s, %s);

-- name: resume_after_rewind
-- `pgleader resume --after-rewind [--open end|requeue]` (by, open): the mode before,
-- the signals open from before the rewind, and whether trading resumed.
select before, open_signals, resumed from gateway.resume_after_rewind(%s, %s);

-- name: watermark_database
-- The rewind guard: which database this is (its name and when pgleader's schema was
-- first installed there): a promoted standby or a restored backup is the same
-- database; a new one is not, and its watermark starts afresh.
select current_database() || ' ' || coalesce((
    select extract(epoch from applied_at)::text from pgleader.schema_migrations
     where stream = 'pgleader' and version = '001'), '');

-- name: watermark_epoch_seen
-- The rewind guard: does the database still hold the epoch this instance saw, with
-- the same leader and, when it saw it, the same start of term (election, epoch,
-- leader, acquired_at or null)? A term re-issued after a rewind may have the same
-- number and even the same leader, never the same start.
select exists (select from pgleader.leadership_history
                where election = %(election)s and epoch = %(epoch)s
                  and instance_id = %(leader)s
                  and (%(acquired_at)s::timestamptz is null
                       or acquired_at = %(acquired_at)s::timestamptz));

-- name: watermark_election
-- The rewind guard: the election's term as every sweep reads it (election).
select epoch, leader, acquired_at from pgleader.leader where election = %s;

-- name: watermark_signal_seen
-- The rewind guard: the fingerprint of the signal this instance last answered as
-- stored (none: the database lacks it).
select fingerprint from gateway.signals where id = %s;

-- name: ledger_positions
-- The ledger's open net position of every instrument, in lots (negative for short).
select instrument, net_lots from gateway.net_positions;

-- name: instruments_in_flight
-- Instruments with an order being executed, or a rollover under way.
select distinct instrument from gateway.signals where status = 'executing'
union
select instrument from gateway.rollovers where state in ('due', 'exiting', 'entering');

-- name: request_reconciliation
-- Ask the leader for a reconciliation run (trigger, by); returns its id.
select gateway.request_reconciliation(%s, %s);

-- name: requested_reconciliations
-- Runs asked for and not yet made, oldest first.
select id, trigger from gateway.reconciliations where outcome is null order by id limit 10;

-- name: finish_reconciliation
-- A run's result (id, epoch, instance, outcome, items, detail); run fenced.
select gateway.finish_reconciliation(%s, %s, %s, %s, %s, %s);

-- name: reconciliation
-- One run: id, trigger, requested, finished, outcome, items, detail.
select id, trigger, requested_by, requested_at, epoch, instance_id, finished_at, outcome, items,
       detail
  from gateway.reconciliations where id = %s;


-- The paper broker (service/brokers/paper.py) ----------------------------------

-- name: paper_place_orders
-- Move each instrument to its target as a broker would (seven parallel arrays:
-- client order id, instrument, target, price, epoch, instance, valid until; one
-- order per instrument): the difference from the paper book's own position is
-- booked as one request; none when it is there already. One statement at a time
-- (the table lock), as one account at a broker. Returns every order with its
-- booking id (null: nothing booked) and whether it was still valid on arrival.
with lock as (
    select pg_advisory_xact_lock(1735815534, 0)  -- the paper book, as one account
), o as (
    select * from unnest(%s::text[], %s::text[], %s::bigint[], %s::numeric[], %s::bigint[],
                         %s::text[], %s::timestamptz[])
           as o (client_order_id, instrument, target, price, epoch, instance_id, valid_until)
      cross join lock
), moves as (
    select o.*, o.target - coalesce((
               select sum(case r.action when 'BUY' then r.quantity else -r.quantity end)
                 from gateway.paper_broker_requests r where r.instrument = o.instrument),
               0)::bigint as delta,
           clock_timestamp() < o.valid_until as valid
      from o
), booked as (
    insert into gateway.paper_broker_requests
        (client_order_id, instrument, action, quantity, price, epoch, instance_id, target)
    select m.client_order_id, m.instrument, gateway.order_action(m.target - m.delta, m.target),
           abs(m.delta), m.price, m.epoch, m.instance_id, m.target
      from moves m where m.valid and m.delta <> 0
    returning client_order_id, id
)
select m.client_order_id, b.id, m.valid
  from moves m left join booked b on b.client_order_id = m.client_order_id;

-- name: paper_positions
-- The paper book's net position of each instrument asked for.
select r.instrument, sum(case r.action when 'BUY' then r.quantity else -r.quantity end)
  from gateway.paper_broker_requests r where r.instrument = any(%s) group by r.instrument;

-- name: paper_orders_since
-- The booking ids of the requests the paper book received for an instrument since a time.
select id from gateway.paper_broker_requests where instrument = %s and received_at >= %s
 order by id;


-- The gateway (service/gateway.py) ---------------------------------------------

-- name: raise_alert
-- An operator alert (kind, instance, detail) with no signal attached.
select gateway.raise_alert(%s, null, %s, %s);

-- name: record_settings
-- This instance's trading-settings fingerprint (election, instance, fingerprint).
select gateway.record_settings(%s, %s, %s);

-- name: settings_of_instances
-- The fingerprints of the instances of an election alive in the last minute (or
-- not registered yet: starting).
select s.instance_id, s.fingerprint
  from gateway.instance_settings s
  left join pgleader.instances i on i.election = s.election and i.instance_id = s.instance_id
 where s.election = %s and coalesce(i.last_heartbeat, s.updated_at) > now() - interval '1 minute'
 order by s.instance_id;

-- name: schema_has_kill_switch
-- The CLI's check that the gateway's schema is there and new enough.
select to_regclass('gateway.trading_halt') is not null;

-- name: election_leader
-- /coordinator/leader: the leader of one election by the database.
select epoch, leader, host, lock_held,
       extract(epoch from heartbeat_age)::float8 from pgleader.leader where election = %s;


-- The leader's jobs (service/jobs/) ---------------------------------------------

-- name: delete_old_signals
-- Retention: one batch of old terminal signals deleted (election, epoch, older
-- than seconds, batch size); the number deleted.
select gateway.delete_old_signals(%s, %s, make_interval(secs => %s), %s);

-- name: prune_instance_settings
-- Stale instances' trading-settings rows (election, epoch, instance ids).
select gateway.prune_instance_settings(%s, %s, %s);

-- name: compute_statistics
-- The statistics document (election, days of history per day).
select gateway.compute_statistics(%s, %s);

-- name: store_statistics
-- The leader stores the statistics (election, epoch, instance, document).
select gateway.store_statistics(%s, %s, %s, %s);

-- name: statistics
-- GET /statistics, `pgleader stats`: the statistics and when they were made.
select statistics, refreshed_at, epoch, instance_id from gateway.portfolio_state;

-- name: open_contracts
-- Each instrument's open position: side, lots, the contract it is in.
select instrument, side, lots, contract, contracts from gateway.open_contracts;

-- name: active_rollovers
-- Rolls not finished, oldest first.
select id, instrument, from_contract, from_expiry, to_contract, to_expiry, side, lots, units,
       state, extract(epoch from now() - updated_at)::float8 as age_s
  from gateway.rollovers where state in ('due', 'exiting', 'entering') order by id;

-- name: start_rollover
-- Open a roll (election, epoch, instance, instrument, from contract, from expiry,
-- to contract, to expiry, lot size); its id, or null when there is nothing to roll.
select gateway.start_rollover(%s, %s, %s, %s, %s, %s, %s, %s, %s);

-- name: set_rollover_state
-- A roll's step (election, epoch, id, state, detail).
select gateway.set_rollover_state(%s, %s, %s, %s, %s);

-- name: book_rollover_order
-- Book a roll step's order before sending it; its client order id and action.
select coid, action from gateway.book_rollover_order(%s, %s, %s, %s, %s, %s, %s, %s, %s);

-- name: record_rollover_order
-- The broker's answer to a roll's order (client order id, outcome, broker id, detail).
select gateway.record_rollover_order(%s, %s, %s, %s);

-- name: finish_rollover
-- The roll is done at the broker: move the ledger (election, epoch, instance, id).
select gateway.finish_rollover(%s, %s, %s, %s);

-- name: serializable
-- The first statement of a rollover's transaction: its ledger changes run
-- SERIALIZABLE (retried on a serialization failure).
set transaction isolation level serializable;

-- name: rollover_last_order_age
-- Seconds since a roll step's latest order was booked (roll, the step's target
-- position: 0 for the exit); null when none was.
select extract(epoch from now() - max(created_at))::float8 from gateway.orders
 where rollover_id = %s and target_position = %s;


-- Alert delivery (service/alerts/) -----------------------------------------------

-- name: start_alert_delivery
-- The leader's start (election, epoch, instance, its sinks): record the sinks and
-- queue the transitions not yet queued. Fenced.
select gateway.start_alert_delivery(%s, %s, %s, %s);

-- name: claim_alert_deliveries
-- What one sink is due to be sent (election, epoch, instance, sink, group interval
-- in s, limit), with each delivery's event. Fenced.
select * from gateway.claim_alert_deliveries(%s, %s, %s, %s, %s, %s);

-- name: finish_alert_deliveries
-- How a send went (epoch, instance, sink, delivery ids, outcome, error without
-- secrets, retry in s, refusals before giving up); returns the deliveries given up.
select gateway.finish_alert_deliveries(%s, %s, %s, %s, %s, %s, %s, %s);

-- name: alert_delivery_status
-- `pgleader sinks`: per sink ever configured, what waits, what went, what was given
-- up, and the latest error.
select s.sink, s.enabled,
       count(d.id) filter (where d.delivered_at is null and d.failed_at is null) as pending,
       count(d.id) filter (where d.delivered_at is not null) as delivered,
       count(d.id) filter (where d.delivered_at is not null and d.repeat) as repeats,
       count(d.id) filter (where d.failed_at is not null) as given_up,
       max(d.delivered_at) as last_delivered_at,
       (select e.last_error from gateway.alert_deliveries e
         where e.sink = s.sink and e.last_error is not null
         order by e.claimed_at desc nulls last, e.id desc limit 1) as last_error
  from gateway.alert_sinks s
  left join gateway.alert_deliveries d on d.sink = s.sink
 group by s.sink, s.enabled
 order by s.sink;


-- The CLI verbs for people (service/cli.py) --------------------------------------

-- name: signal_list
-- `pgleader signals`: the latest signals, newest first, each with its orders;
-- filtered by status and by the since bound (since_at a time, since_s seconds back
-- by this clock); a null filter filters nothing.
select s.id, s.received_at, s.type, s.instrument, s.position, s.side, s.lots, s.price::float8,
       s.status, s.received_by, s.claimed_epoch as epoch, s.finished_at, s.detail,
       coalesce((select json_agg(json_build_object(
                    'client_order_id', o.client_order_id, 'outcome', o.outcome,
                    'symbol', o.symbol, 'side', o.side, 'lots', o.lots,
                    'start_position', o.start_position, 'target_position', o.target_position,
                    'created_at', o.created_at) order by o.id)
                   from gateway.orders o where o.signal_id = s.id), '[]'::json) as orders
  from gateway.signals s
 where (%(status)s::text is null or s.status = %(status)s)
   and (%(since_at)s::timestamptz is null or s.received_at >= %(since_at)s)
   and (%(since_s)s::float8 is null
        or s.received_at >= clock_timestamp() - make_interval(secs => %(since_s)s))
 order by s.id desc
 limit %(limit)s;

-- name: open_position_list
-- `pgleader positions`: what the ledger holds, per instrument and side: lots, the
-- entries (TradingView's positions) and their average entry price, since when, and
-- the contract(s) they are in.
select instrument, side, sum(lots)::int as lots, count(*)::int as entries,
       (sum(entry_price * lots) filter (where entry_price is not null)
        / nullif(sum(lots) filter (where entry_price is not null), 0))::float8
           as avg_entry_price,
       min(entry_at) as since, string_agg(distinct contract, ', ') as contract,
       string_agg(position, ', ' order by entry_at, id) as positions
  from gateway.positions
 where status = 'open'
 group by instrument, side
 order by instrument, side;

-- name: alert_list
-- `pgleader alerts`: the latest alerts, newest first, within the since bound (as
-- signal_list's).
select id, created_at, kind, signal_id, instance_id, detail
  from gateway.alerts
 where (%(since_at)s::timestamptz is null or created_at >= %(since_at)s)
   and (%(since_s)s::float8 is null
        or created_at >= clock_timestamp() - make_interval(secs => %(since_s)s))
 order by id desc
 limit %(limit)s;
