// Prints aigen/n8n/credentials.template.json with the compose stack's hosts and the secrets
// from the environment filled in; ids are kept (the workflow refers to them).
const fs = require("fs");
const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const fill = {
  rabbitmq: { hostname: "rabbitmq", port: 5672, vhost: "/", ssl: false,
              username: env("RABBITMQ_USER"), password: env("RABBITMQ_PASSWORD") },
  s3: { endpoint: "http://minio:9000", region: "us-east-1", forcePathStyle: true,
        accessKeyId: env("MINIO_ROOT_USER"), secretAccessKey: env("MINIO_ROOT_PASSWORD") },
  httpHeaderAuth: { name: "Authorization", value: `Bearer ${env("IMAGE_API_KEY")}` },
};
const creds = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
for (const cred of creds) {
  if (!fill[cred.type]) throw new Error(`unexpected credential type ${cred.type}`);
  Object.assign(cred.data, fill[cred.type]);
}
process.stdout.write(JSON.stringify(creds, null, 2));
