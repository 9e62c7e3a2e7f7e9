# The listener the brokers use: TLS with the certificate the init service issued for `openbao`.
listener "tcp" {
  address         = "0.0.0.0:8200"
  tls_cert_file   = "/etc/openbao/tls/tls.crt"
  tls_key_file    = "/etc/openbao/tls/tls.key"
  tls_min_version = "tls12"
}

api_addr      = "https://openbao:8200"
disable_mlock = true
