// Creates the application's MongoDB user on the first start of an empty data volume.
// Run by the mongo image's entrypoint (docker-entrypoint-initdb.d), authenticated as the
// root user from MONGO_INITDB_ROOT_USERNAME / MONGO_INITDB_ROOT_PASSWORD. The app user
// may read and write its own database only (readWrite: documents and indexes), nothing else.
// docker-compose.yml passes MONGO_APP_USERNAME, MONGO_APP_PASSWORD and MONGO_APP_DB from .env.
// Scripts here run only when /data/db is empty: for an existing volume, run this file once by
// hand: docker compose exec mongo mongosh -u "$MONGO_ROOT_USERNAME" -p --authenticationDatabase admin /docker-entrypoint-initdb.d/create-app-user.js
// (with MONGO_APP_* set in that shell), or create the user with the same command.
const user = process.env.MONGO_APP_USERNAME;
const pwd = process.env.MONGO_APP_PASSWORD;
const dbName = process.env.MONGO_APP_DB || "argus";
if (!user || !pwd) {
  throw new Error("MONGO_APP_USERNAME and MONGO_APP_PASSWORD must be set (see .env.example)");
}
const appDb = db.getSiblingDB(dbName);
if (appDb.getUser(user) === null) {
  appDb.createUser({ user: user, pwd: pwd, roles: [{ role: "readWrite", db: dbName }] });
  print(`created MongoDB user ${user} (readWrite on ${dbName})`);
} else {
  print(`MongoDB user ${user} already exists on ${dbName}`);
}
