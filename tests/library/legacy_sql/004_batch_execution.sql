-- pgleader 004: the gateway's executor works in batches. One statement claims
-- every signal of a batch under the epoch fence, one records what the broker said
-- of every order. The per-signal functions of 002 stay the rule; these only run
-- them for many signals in one transaction. Idempotent.

-- Claim the given signals for execution under epoch p_epoch of p_election.
-- Fenced first (pgleader.check_epoch raises PGL01 for a stale epoch, and nothing
-- is claimed); then, in the order given, each pending signal is claimed as by
-- gateway.claim_signal. One row per id. `acted` says this call moved it: to
-- 'executing' (client_order_id names the order to send now), or ended it
-- 'expired'/'rejected'. Otherwise status is the signal's own, not ours to act on
-- ('pending' when another transaction holds it; null for an unknown id).
create or replace function gateway.claim_signals(
    p_election text, p_epoch bigint, p_ids bigint[], p_instance text, p_broker text,
    p_max_age interval
) returns table (
    signal_id bigint, acted boolean, status text, client_order_id text, instrument text,
    action text, quantity bigint, price numeric
) language plpgsql as $$
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    return query
    select t.id, c.status is not null, coalesce(c.status, s.status), c.client_order_id,
           c.instrument, c.action, c.quantity, c.price
      from unnest(p_ids) with ordinality as t (id, n)
      left join lateral gateway.claim_signal(t.id, p_epoch, p_instance, p_broker, p_max_age) c
        on true
      left join gateway.signals s on s.id = t.id
     order by t.n;
end
$$;

-- Record the broker's answers for many orders at once (gateway.complete_order each,
-- in the order given). Returns each order's signal status afterwards.
create or replace function gateway.complete_orders(
    p_client_order_ids text[], p_outcomes text[], p_broker_order_ids text[], p_details text[]
) returns table (client_order_id text, status text) language plpgsql as $$
begin
    return query
    select t.coid, gateway.complete_order(t.coid, t.outcome, t.broker_order_id, t.detail)
      from unnest(p_client_order_ids, p_outcomes, p_broker_order_ids, p_details)
           with ordinality as t (coid, outcome, broker_order_id, detail, n)
     order by t.n;
end
$$;
