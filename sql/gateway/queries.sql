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
        n int, fp text, type text, instrument text, position text, lots int, price numeric,
        stop numeric, signal_at timestamptz, payload jsonb, received_at timestamptz,
        notify bool)
), new as (
    insert into gateway.signals
        (fingerprint, type, instrument, position, lots, price, stop, signal_at, payload,
         received_by, received_at)
    select fp, type, instrument, position, lots, price, stop, signal_at, payload,
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
select id as signal_id, status, type, instrument, position, lots, price, stop,
       signal_at, received_by, received_at, claimed_epoch, claimed_by, finished_at, detail,
       (select json_agg(json_build_object('client_order_id', o.client_order_id,
          'epoch', o.epoch, 'broker_order_id', o.broker_order_id, 'outcome', o.outcome)
          order by o.id) from gateway.orders o where o.signal_id = s.id) as orders
  from gateway.signals s where id = %s;


-- The executor (service/execution/executor.py) ---------------------------------

-- name: claim_signals
-- Fenced claim of a batch: pending -> executing, an order booked per signal
-- (election, epoch, ids, instance, broker, max_age).
select signal_id, acted, status, client_order_id, instrument, action, quantity, price
  from gateway.claim_signals(%s, %s, %s, %s, %s, %s);

-- name: complete_orders
-- Record the broker's answers, by client order id (four parallel arrays).
select client_order_id, status from gateway.complete_orders(%s, %s, %s, %s);

-- name: pending_signals
-- The sweep: pending signals, oldest first (a NOTIFY may have been missed).
select id from gateway.signals where status = 'pending' order by received_at limit %s;

-- name: executing_signals
-- Reconciliation: signals left 'executing'; those of our own epoch only once any
-- send of ours must have ended (claimed more than %(grace)s ago).
select signal_id, claimed_epoch, client_order_id from gateway.executing
 where claimed_epoch <> %(epoch)s or claimed_at < now() - %(grace)s
 order by claimed_at limit %(limit)s;

-- name: mark_in_doubt
-- The broker cannot tell whether it got the order: in_doubt, with an alert.
select gateway.mark_in_doubt(%s, %s);

-- name: requeue_signal
-- The broker never got the order: back to pending (run fenced, in a transaction).
select gateway.requeue_signal(%s);


-- The paper broker (service/brokers/paper.py) ----------------------------------

-- name: paper_place_orders
-- Book every order still valid on arrival (eight parallel arrays); returns the
-- booking id of each accepted client order id.
insert into gateway.paper_broker_requests
    (client_order_id, instrument, action, quantity, price, epoch, instance_id)
select o.client_order_id, o.instrument, o.action, o.quantity, o.price, o.epoch, o.instance_id
  from unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::numeric[], %s::bigint[],
              %s::text[], %s::timestamptz[])
       as o (client_order_id, instrument, action, quantity, price, epoch, instance_id, valid_until)
 where clock_timestamp() < o.valid_until
returning client_order_id, id;

-- name: paper_lookup_order
-- Did the paper broker get this client order id? Its first booking id, or null.
select min(id) from gateway.paper_broker_requests where client_order_id = %s;


-- The gateway (service/gateway.py) ---------------------------------------------

-- name: raise_alert
-- An operator alert (kind, instance, detail) with no signal attached.
select gateway.raise_alert(%s, null, %s, %s);

-- name: election_leader
-- /coordinator/leader: the leader of one election by the database.
select epoch, leader, host, lock_held,
       extract(epoch from heartbeat_age)::float8 from pgleader.leader where election = %s;
