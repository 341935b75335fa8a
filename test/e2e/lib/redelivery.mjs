// Two steps shared by the tests that carry sbpg's state to another cluster (backup.test.mjs:
// pg_dump and restore; test/pg-upgrade: pg_upgrade) and then prove that the inbox still recognises
// a redelivery.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { installOrders, waitFor } from "./cluster.mjs";

/**
 * Configures `cluster` as the carrying tests expect: the orders table and handler, an SAS identity
 * for the emulator, a registered type `orders.created` with a mapping to `orders`, and subscription
 * `sub` on `entity` (schemas validated, unknown types passed to the handler).
 */
export async function setUpOrders(cluster, emu, sub, entity) {
  await installOrders(cluster);
  await cluster.psql(`
    SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
    SELECT sbpg.grant_identity('emu', 'app');
    SELECT sbpg.register_schema('orders.created', 1, '{"type": "object"}');
    SELECT sbpg.create_subscription('${sub}', '${emu.amqp}', '${entity}', 'apply_order(sbpg.message)', 'app', 'emu', batch_size => 10,
                                    options => '{"schemas": "validate", "unknown_types": "pass"}');
    SELECT sbpg.create_mapping('${sub}', 'orders.created', 'orders');
  `);
}

/**
 * Has the worker of `sub` commit `message` and die before settling it (test fault
 * exit_after_commit), with sbemu refusing new connections first so that the restarted worker
 * cannot take the redelivery. Leaves the fault armed and sbemu refusing: the caller stops or
 * disables the subscription, then calls `emu.fault("clear")`. Returns the message's inbox row
 * (sequence_number, settled_at), checked unsettled.
 */
export async function commitWithoutSettling(cluster, emu, sender, sub, message) {
  const tag = `exit_after_commit#carry-${randomUUID()}`;
  await cluster.query(`ALTER SYSTEM SET sbpg.test_fault = '${tag}'`);
  await cluster.query("SELECT pg_reload_conf()");
  await waitFor(async () => (await cluster.query("SELECT current_setting('sbpg.test_fault') v")).rows[0].v === tag, { what: "fault armed" });
  await emu.fault("refuse-connections", { seconds: 600 });
  await sender.sendMessages(message); // the sender's connection is already open
  const inboxRow = async () => (await cluster.query(
    "SELECT sequence_number, settled_at FROM sbpg.inbox WHERE subscription = $1 AND message_id = $2", [sub, message.messageId])).rows[0];
  await waitFor(inboxRow, { what: `${message.messageId} recorded in the inbox` });
  await waitFor(() => cluster.serverLog().includes(`test fault ${tag}`), { what: "the fault to fire" });
  const row = await inboxRow();
  assert.equal(row.settled_at, null, `${message.messageId} was never settled`);
  return row;
}
